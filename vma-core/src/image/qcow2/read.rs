//! Reading qcow2 images (versions 2 and 3) as archive sources: the active
//! layer through L1/L2 tables, compressed clusters (zlib and zstd), zero
//! clusters, and backing chains. Unallocated and zero clusters are reported
//! as zero stretches and never read.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, IoContext, Result};
use crate::format::qcow2::{
    decode_extensions, decode_l2, decode_table, feature_names, l1_entries_for, CompressionType,
    L2Entry, Qcow2Error, Qcow2Header, EXT_BACKING_FORMAT, EXT_FEATURE_NAMES,
    INCOMPAT_COMPRESSION_TYPE, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2,
    INCOMPAT_EXTERNAL_DATA, OFFSET_MASK,
};
use crate::image::source::{DiskImage, Stretch};

/// QEMU refuses L1 tables above 32 MiB; so do we.
const MAX_L1_BYTES: u64 = 32 << 20;
/// L2 tables kept decoded (each maps cluster_size * cluster_size / 8 bytes).
const L2_CACHE_TABLES: usize = 16;
/// Stop extending a stretch after this many clusters (bounds one call).
const MAX_STRETCH_CLUSTERS: u64 = 4096;

/// A qcow2 image opened for reading.
pub struct Qcow2Image {
    file: File,
    path: PathBuf,
    file_len: u64,
    header: Qcow2Header,
    l1: Vec<u64>,
    l2_cache: Mutex<VecDeque<(u64, Arc<Vec<u64>>)>>,
    /// The last decompressed cluster, by host offset.
    decompressed: Mutex<Option<(u64, Vec<u8>)>>,
    backing: Option<Box<dyn DiskImage>>,
}

fn image_error(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.display().to_string(),
        what: what.to_string(),
    }
}

/// Opens the backing image an image names: called with the naming image's
/// path, the backing file name and format from its header, and the naming
/// image's depth.
pub type OpenBacking<'a> =
    dyn Fn(&Path, &str, Option<&str>, usize) -> Result<Box<dyn DiskImage>> + 'a;

impl Qcow2Image {
    /// Open the qcow2 image at `path` and its backing chain, with backing
    /// files read only inside its directory (see [`BackingPolicy`]);
    /// `depth` is the number of images above it (chains deeper than 64 are
    /// refused).
    pub fn open(path: &Path, depth: usize) -> Result<Qcow2Image> {
        let (file, _) = crate::image::source::open_checked(path, true)?;
        let policy = BackingPolicy::new(path, &[])?;
        Qcow2Image::open_file(file, path, depth, &|p, n, f, d| policy.open(p, n, f, d))
    }

    /// Like [`Qcow2Image::open`], for a file already open (`path` names it
    /// in messages), with its backing image opened by `open_backing`.
    pub fn open_file(
        file: File,
        path: &Path,
        depth: usize,
        open_backing: &OpenBacking<'_>,
    ) -> Result<Qcow2Image> {
        let meta = file
            .metadata()
            .ctx(|| format!("inspecting {}", path.display()))?;
        let file_len = if meta.is_file() {
            meta.len()
        } else {
            // A block device the user named as qcow2.
            use std::io::Seek;
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .ctx(|| format!("finding the size of {}", path.display()))?
        };
        let mut first = vec![0u8; file_len.min(1 << 21) as usize];
        file.read_exact_at(&mut first, 0)
            .ctx(|| format!("reading the header of {}", path.display()))?;
        let header = Qcow2Header::decode(&first).map_err(|e| image_error(path, e))?;
        let cluster_size = header.cluster_size();
        let ext_area_end = (cluster_size as usize).min(first.len());
        let ext_area = first
            .get(header.header_length as usize..ext_area_end)
            .unwrap_or_default();
        let extensions = if header.version >= 3 {
            decode_extensions(ext_area).map_err(|e| image_error(path, e))?
        } else {
            // Version 2 images may have anything after the header.
            decode_extensions(ext_area).unwrap_or_default()
        };
        let unsupported = |feature: &str| Error::UnsupportedImage {
            path: path.display().to_string(),
            feature: feature.to_string(),
        };
        match header.crypt_method {
            0 => {}
            1 => return Err(unsupported("encryption (AES, crypt_method 1)")),
            2 => return Err(unsupported("encryption (LUKS, crypt_method 2)")),
            m => return Err(unsupported(&format!("encryption (crypt_method {m})"))),
        }
        let incompat = header.incompatible_features;
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(image_error(
                path,
                "the image is marked corrupt (incompatible feature bit 1); `qemu-img check -r all` may repair it",
            ));
        }
        if incompat & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(unsupported(
                "external data file (incompatible feature bit 2)",
            ));
        }
        if incompat & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(unsupported(
                "extended L2 entries / subclusters (incompatible feature bit 4)",
            ));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION_TYPE;
        if incompat & !known != 0 {
            let table = extensions
                .iter()
                .find(|e| e.kind == EXT_FEATURE_NAMES)
                .map(|e| feature_names(&e.data))
                .unwrap_or_default();
            let names: Vec<String> = (0..64)
                .filter(|b| incompat & !known & (1u64 << b) != 0)
                .map(
                    |b| match table.iter().find(|(t, bit, _)| *t == 0 && *bit as u32 == b) {
                        Some((_, _, name)) => format!("{name} (incompatible feature bit {b})"),
                        None => format!("incompatible feature bit {b}"),
                    },
                )
                .collect();
            return Err(unsupported(&names.join(", ")));
        }
        let needed = l1_entries_for(header.size, header.cluster_bits);
        if (header.l1_size as u64) < needed {
            return Err(image_error(
                path,
                format!(
                    "the L1 table has {} entries, a disk of {} bytes needs {needed}",
                    header.l1_size, header.size
                ),
            ));
        }
        let l1_bytes = header.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(image_error(
                path,
                format!("the L1 table of {l1_bytes} bytes exceeds {MAX_L1_BYTES}"),
            ));
        }
        let l1_end = header.l1_table_offset.checked_add(l1_bytes);
        if header.l1_table_offset % cluster_size != 0 || l1_end.is_none_or(|e| e > file_len) {
            return Err(image_error(
                path,
                format!(
                    "the L1 table at offset {} ({l1_bytes} bytes) is unaligned or beyond the end of the file ({file_len} bytes)",
                    header.l1_table_offset
                ),
            ));
        }
        let mut raw_l1 = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw_l1, header.l1_table_offset)
            .ctx(|| format!("reading the L1 table of {}", path.display()))?;
        let l1 = decode_table(&raw_l1, header.l1_table_offset, "L1 table")
            .map_err(|e| image_error(path, e))?;

        let backing = if header.backing_file_offset != 0 {
            let start = header.backing_file_offset;
            let end = start.saturating_add(header.backing_file_size as u64);
            if end > first.len() as u64 {
                return Err(image_error(
                    path,
                    format!(
                        "the backing file name at offset {start} lies outside the first cluster"
                    ),
                ));
            }
            let name = String::from_utf8(first[start as usize..end as usize].to_vec())
                .map_err(|_| image_error(path, "the backing file name is not UTF-8"))?;
            let format = extensions
                .iter()
                .find(|e| e.kind == EXT_BACKING_FORMAT)
                .map(|e| String::from_utf8_lossy(&e.data).into_owned());
            Some(open_backing(path, &name, format.as_deref(), depth)?)
        } else {
            None
        };
        Ok(Qcow2Image {
            file,
            path: path.to_path_buf(),
            file_len,
            header,
            l1,
            l2_cache: Mutex::new(VecDeque::new()),
            decompressed: Mutex::new(None),
            backing,
        })
    }

    /// The decoded header.
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    /// The L2 table at host offset `offset` (cached).
    fn l2_table(&self, offset: u64) -> Result<Arc<Vec<u64>>> {
        let mut cache = self.l2_cache.lock().expect("L2 cache lock");
        if let Some(pos) = cache.iter().position(|(o, _)| *o == offset) {
            let hit = cache.remove(pos).expect("present");
            cache.push_front(hit.clone());
            return Ok(hit.1);
        }
        let cs = self.header.cluster_size();
        if !offset.is_multiple_of(cs) || offset + cs > self.file_len {
            return Err(image_error(
                &self.path,
                format!(
                    "an L1 entry points at offset {offset}, which is unaligned or beyond the end of the file ({} bytes)",
                    self.file_len
                ),
            ));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file.read_exact_at(&mut raw, offset).ctx(|| {
            format!(
                "reading the L2 table at offset {offset} of {}",
                self.path.display()
            )
        })?;
        let table: Arc<Vec<u64>> = Arc::new(
            decode_table(&raw, offset, "L2 table").map_err(|e| image_error(&self.path, e))?,
        );
        cache.push_front((offset, table.clone()));
        cache.truncate(L2_CACHE_TABLES);
        Ok(table)
    }

    /// The mapping of guest cluster `gc`.
    fn entry(&self, gc: u64) -> Result<L2Entry> {
        let per = self.header.l2_entries();
        let l1e = self.l1[(gc / per) as usize];
        let l2_offset = l1e & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(L2Entry::Unallocated);
        }
        let table = self.l2_table(l2_offset)?;
        decode_l2(
            table[(gc % per) as usize],
            self.header.cluster_bits,
            self.header.version,
        )
        .map_err(|e| {
            image_error(
                &self.path,
                format!("guest offset {}: {e}", gc << self.header.cluster_bits),
            )
        })
    }

    /// Decompress the cluster of guest offset `guest` stored at `offset`,
    /// `len` bytes.
    fn decompress(&self, guest: u64, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let mut cache = self.decompressed.lock().expect("decompression cache lock");
        if let Some((o, data)) = cache.as_ref() {
            if *o == offset {
                out.copy_from_slice(data);
                return Ok(());
            }
        }
        let end = offset.saturating_add(len).min(self.file_len);
        if offset >= end {
            return Err(image_error(
                &self.path,
                format!("a compressed cluster at offset {offset} lies beyond the end of the file"),
            ));
        }
        let mut input = vec![0u8; (end - offset) as usize];
        self.file.read_exact_at(&mut input, offset).ctx(|| {
            format!(
                "reading a compressed cluster at offset {offset} of {}",
                self.path.display()
            )
        })?;
        let compression = self.header.compression_type;
        let done = match compression {
            CompressionType::Zlib => inflate_raw(&input, out),
            CompressionType::Zstd => zstd_fill(&input, out),
        };
        let problem = match done {
            Ok(got) if got == out.len() => None,
            Ok(got) => Some(Qcow2Error::ShortCluster {
                guest,
                host: offset,
                compression,
                got,
                want: out.len(),
            }),
            Err(what) => Some(Qcow2Error::Decompress {
                guest,
                host: offset,
                compression,
                what,
            }),
        };
        if let Some(e) = problem {
            return Err(image_error(&self.path, e));
        }
        *cache = Some((offset, out.to_vec()));
        Ok(())
    }
}

/// Inflate raw deflate data into `out`: the bytes decompressed (fewer
/// than `out` holds when the data ends early), or what the decoder said.
fn inflate_raw(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    let mut d = flate2::Decompress::new(false);
    d.decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| e.to_string())?;
    Ok(d.total_out() as usize)
}

/// Decode zstd frames until `out` is full (bytes after that are ignored):
/// the bytes decompressed (fewer when the data ends early), or what the
/// decoder said.
fn zstd_fill(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().map_err(|e| e.to_string())?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    while outb.pos() < outb.capacity() {
        let before = (inb.pos(), outb.pos());
        d.run(&mut inb, &mut outb).map_err(|e| e.to_string())?;
        if (inb.pos(), outb.pos()) == before {
            break;
        }
    }
    Ok(outb.pos())
}

/// Where the backing files of a qcow2 image may be read from. A backing
/// file name is read from the image (bytes that whoever made the image
/// chose), so it is followed only:
///
/// - to a local file (no `json:` or URL names) that resolves, symbolic
///   links and `..` resolved, inside the directory of the image the user
///   named or one of the directories allowed explicitly;
/// - to a regular file (never a FIFO, device, socket or directory), opened
///   without following a symbolic link and without blocking, and checked
///   again once open (type, identity, and where the open file really is);
/// - when the image states the backing file's format (`raw` or `qcow2`):
///   a format is never guessed from the backing file's contents, which
///   may have been written by a guest. `qemu-img rebase -u -F FORMAT -b
///   NAME IMAGE` records it without touching any data.
#[derive(Clone, Debug)]
pub struct BackingPolicy {
    /// Canonical directories backing files must lie in.
    roots: Vec<PathBuf>,
}

impl BackingPolicy {
    /// Backing files inside the directory of `image` (and below) and
    /// inside each of `allow`.
    pub fn new(image: &Path, allow: &[PathBuf]) -> Result<BackingPolicy> {
        let dir = match image.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut roots = Vec::new();
        for d in std::iter::once(dir).chain(allow.iter().map(PathBuf::as_path)) {
            let c = std::fs::canonicalize(d)
                .ctx(|| format!("resolving the backing file directory {}", d.display()))?;
            if !c.is_dir() {
                return Err(Error::Invalid(format!(
                    "{} is not a directory (backing files are allowed in directories)",
                    d.display()
                )));
            }
            roots.push(c);
        }
        Ok(BackingPolicy { roots })
    }

    fn allows(&self, path: &Path) -> bool {
        self.roots.iter().any(|r| path.starts_with(r))
    }

    fn roots_text(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Open the backing file `name` (format `format`, from the header) of
    /// the image at `path`, which is `depth` images below the top.
    pub fn open(
        &self,
        path: &Path,
        name: &str,
        format: Option<&str>,
        depth: usize,
    ) -> Result<Box<dyn DiskImage>> {
        let refuse = |what: String| image_error(path, what);
        if name.starts_with("json:") || name.contains("://") {
            return Err(Error::UnsupportedImage {
                path: path.display().to_string(),
                feature: format!("backing file {name:?} (only local files are supported)"),
            });
        }
        if depth >= 64 {
            return Err(refuse(
                "the backing chain is deeper than 64 images (is it a loop?)".into(),
            ));
        }
        let is_qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(other) => {
                return Err(Error::UnsupportedImage {
                    path: path.display().to_string(),
                    feature: format!(
                        "backing file format {other:?} (supported: raw, qcow2)"
                    ),
                })
            }
            None => {
                return Err(refuse(format!(
                    "names the backing file {name:?} without its format, and vma never guesses a format from a file's contents (a guest may have written them); record it with `qemu-img rebase -u -F raw|qcow2 -b {name} {}`",
                    path.display()
                )))
            }
        };
        let backing = Path::new(name);
        let resolved = if backing.is_absolute() {
            backing.to_path_buf()
        } else {
            path.parent().unwrap_or(Path::new(".")).join(backing)
        };
        let outside = |real: &Path| {
            refuse(format!(
                "its backing file {name:?} resolves to {}, outside the directories backing files are read from ({}); if you trust it, allow its directory with --allow-backing DIR",
                real.display(),
                self.roots_text()
            ))
        };
        let canonical = std::fs::canonicalize(&resolved).ctx(|| {
            format!(
                "backing file of {}: opening {}",
                path.display(),
                resolved.display()
            )
        })?;
        if !self.allows(&canonical) {
            return Err(outside(&canonical));
        }
        let (file, _) =
            crate::image::source::open_checked(&canonical, false).map_err(|e| match e {
                Error::Io { context, source } => Error::Io {
                    context: format!("backing file of {}: {context}", path.display()),
                    source,
                },
                Error::Invalid(what) => refuse(format!("its backing file {what}")),
                other => other,
            })?;
        // Where the open file really is (a directory renamed meanwhile).
        let fd_link = format!(
            "/proc/self/fd/{}",
            std::os::unix::io::AsRawFd::as_raw_fd(&file)
        );
        if let Ok(real) = std::fs::read_link(fd_link) {
            if !self.allows(&real) {
                return Err(outside(&real));
            }
        }
        if is_qcow2 {
            Ok(Box::new(Qcow2Image::open_file(
                file,
                &resolved,
                depth + 1,
                &|p, n, f, d| self.open(p, n, f, d),
            )?))
        } else {
            Ok(Box::new(crate::image::source::RawImage::open_file(
                file, &resolved,
            )?))
        }
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn status(&self, offset: u64) -> Result<Stretch> {
        #[derive(PartialEq)]
        enum Class {
            Data,
            Zero,
            Below,
        }
        let class = |e: L2Entry| match e {
            L2Entry::Data(_) | L2Entry::Compressed { .. } => Class::Data,
            L2Entry::Zero => Class::Zero,
            L2Entry::Unallocated => Class::Below,
        };
        let size = self.header.size;
        let bits = self.header.cluster_bits;
        let per = self.header.l2_entries();
        let gc = offset >> bits;
        let first = class(self.entry(gc)?);
        let table_end = (gc / per + 1) * per;
        let mut end = gc + 1;
        let mut l1_index = (gc / per) as usize;
        if self.l1[l1_index] & OFFSET_MASK == 0 {
            // Skip every L1 entry without a table in one step.
            while l1_index + 1 < self.l1.len() && self.l1[l1_index + 1] & OFFSET_MASK == 0 {
                l1_index += 1;
            }
            end = (l1_index as u64 + 1) * per;
        } else {
            while end < table_end
                && end - gc < MAX_STRETCH_CLUSTERS
                && (end << bits) < size
                && class(self.entry(end)?) == first
            {
                end += 1;
            }
        }
        let len = end.saturating_mul(1 << bits).min(size) - offset;
        Ok(match first {
            Class::Data => Stretch::Data(len),
            Class::Zero => Stretch::Zero(len),
            Class::Below => match &self.backing {
                Some(b) if offset < b.size() => match b.status(offset)? {
                    Stretch::Data(n) => Stretch::Data(n.min(len)),
                    Stretch::Zero(n) => Stretch::Zero(n.min(len)),
                },
                _ => Stretch::Zero(len),
            },
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bits = self.header.cluster_bits;
        let cs = self.header.cluster_size();
        let mut done = 0usize;
        let mut cluster_buf = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos & (cs - 1);
            let n = ((cs - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.entry(pos >> bits)? {
                L2Entry::Zero => out.fill(0),
                L2Entry::Data(host) => {
                    if host + cs > self.file_len {
                        return Err(image_error(
                            &self.path,
                            format!(
                                "guest offset {pos} maps to host offset {host}, beyond the end of the file ({} bytes)",
                                self.file_len
                            ),
                        ));
                    }
                    self.file.read_exact_at(out, host + within).ctx(|| {
                        format!(
                            "reading {} at offset {}",
                            self.path.display(),
                            host + within
                        )
                    })?;
                }
                L2Entry::Compressed { offset: c, len } => {
                    cluster_buf.resize(cs as usize, 0);
                    self.decompress(pos - within, c, len, &mut cluster_buf)?;
                    out.copy_from_slice(&cluster_buf[within as usize..within as usize + n]);
                }
                L2Entry::Unallocated => match &self.backing {
                    Some(b) if pos < b.size() => {
                        let k = ((b.size() - pos) as usize).min(n);
                        b.read_at(&mut out[..k], pos)?;
                        out[k..].fill(0);
                    }
                    _ => out.fill(0),
                },
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atomic::AtomicFile;
    use crate::image::qcow2::write::{cluster_compressor, compress_cluster, Qcow2Writer};
    use proptest::prelude::*;

    /// A small image from our writer: plain and compressed clusters.
    fn sample(path: &Path, compress: bool) {
        let mut w =
            Qcow2Writer::new(AtomicFile::create(path).unwrap(), 40 << 20, compress).unwrap();
        let mut zstd = cluster_compressor().unwrap();
        for c in [0u64, 1, 2, 17, 300, 639] {
            let data: Vec<u8> = (0..65536u32).map(|i| (i / 700 + c as u32) as u8).collect();
            match compress
                .then(|| compress_cluster(&data, &mut zstd).unwrap())
                .flatten()
            {
                Some(packed) => w.write_compressed(c, &packed).unwrap(),
                None => w.write_blocks(c, u16::MAX, &data).unwrap(),
            }
        }
        w.finish().unwrap().commit().unwrap();
    }

    /// A compressed cluster whose data is damaged is a typed error naming
    /// the cluster's guest offset and the host offset of its data.
    #[test]
    fn a_damaged_compressed_cluster_names_guest_and_host_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.qcow2");
        sample(&path, true);
        let img = Qcow2Image::open(&path, 0).unwrap();
        let guest = 17u64 << 16;
        let L2Entry::Compressed { offset: host, len } = img.entry(17).unwrap() else {
            panic!("cluster 17 is not compressed");
        };
        drop(img);
        let mut bytes = std::fs::read(&path).unwrap();
        // Garbage where the zstd frame starts, then a truncated frame.
        bytes[host as usize..host as usize + 4].copy_from_slice(b"junk");
        std::fs::write(&path, &bytes).unwrap();
        let img = Qcow2Image::open(&path, 0).unwrap();
        let mut buf = vec![0u8; 65536];
        let err = img.read_at(&mut buf, guest).unwrap_err().to_string();
        let want = Qcow2Error::Decompress {
            guest,
            host,
            compression: CompressionType::Zstd,
            what: String::new(),
        }
        .to_string();
        assert!(err.contains(want.trim_end()), "{err}\nwant {want}");

        let mut bytes = std::fs::read(&path).unwrap();
        let packed = {
            let data: Vec<u8> = (0..65536u32).map(|i| (i / 700 + 17) as u8).collect();
            let mut z = cluster_compressor().unwrap();
            compress_cluster(&data, &mut z).unwrap().unwrap()
        };
        // A valid frame cut short: fewer bytes than a cluster come out.
        let cut = packed.len() / 2;
        bytes[host as usize..host as usize + len as usize].fill(0);
        bytes[host as usize..host as usize + cut].copy_from_slice(&packed[..cut]);
        std::fs::write(&path, &bytes).unwrap();
        let img = Qcow2Image::open(&path, 0).unwrap();
        let err = img.read_at(&mut buf, guest).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "the compressed cluster of guest offset {guest} at host offset {host}"
            )),
            "{err}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Damaged images never panic or run away: opening, mapping and
        /// reading either work or return an error.
        #[test]
        fn damaged_images_give_errors_not_panics(
            compress in any::<bool>(),
            hits in proptest::collection::vec((any::<bool>(), any::<u64>(), any::<u8>()), 1..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("d.qcow2");
            sample(&path, compress);
            let mut bytes = std::fs::read(&path).unwrap();
            let header = Qcow2Header::decode(&bytes).unwrap();
            for (in_header, at, value) in hits {
                // Half the hits go to the header, the rest to the tables.
                let pos = if in_header {
                    at % 128
                } else {
                    let tables = [header.l1_table_offset, header.refcount_table_offset, 65536];
                    tables[(at % 3) as usize] + (at >> 8) % 1024
                };
                if let Some(b) = bytes.get_mut(pos as usize) {
                    *b = value;
                }
            }
            std::fs::write(&path, &bytes).unwrap();
            let Ok(img) = Qcow2Image::open(&path, 0) else { return Ok(()) };
            let mut buf = vec![0u8; 1 << 20];
            let mut read = 0u64;
            let mut next = 0;
            while let Ok(Some(run)) = crate::image::source::next_data_run(&img, next) {
                next = run.end;
                let start = run.start * 65536;
                let len = ((run.end - run.start) * 65536).min(img.size() - start).min(1 << 20);
                let _ = img.read_at(&mut buf[..len as usize], start);
                read += len;
                if read > 256 << 20 {
                    break;
                }
            }
        }
    }
}

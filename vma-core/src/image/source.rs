//! Raw image sources (regular files and block devices): holes found with
//! SEEK_DATA/SEEK_HOLE become zero clusters without being read, data is fed
//! to the Writer in order.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::format::CLUSTER_SIZE;
use crate::types::{cluster_len, clusters_for, ClusterNo, ClusterWriter, DriveId};

/// Clusters read per request.
const CHUNK_CLUSTERS: u64 = 16;

/// A raw disk image or block device opened for reading.
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawImage {
    /// Open `path` read-only (checked as [`open_checked`] does); its size
    /// is the file's length (or the block device's).
    pub fn open(path: &Path) -> Result<RawImage> {
        let (file, _) = open_checked(path, true)?;
        RawImage::open_file(file, path)
    }

    /// Like [`RawImage::open`], for a file already open (`path` names it in
    /// messages).
    pub fn open_file(mut file: File, path: &Path) -> Result<RawImage> {
        let meta = file
            .metadata()
            .ctx(|| format!("inspecting {}", path.display()))?;
        check_kind(&meta, path, true)?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            file.seek(SeekFrom::End(0))
                .ctx(|| format!("finding the size of {}", path.display()))?
        };
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// SEEK_DATA/SEEK_HOLE; everything is data where the file system cannot tell.
    fn status(&self, offset: u64) -> Result<Stretch> {
        let fd = self.file.as_raw_fd();
        let rest = self.size - offset;
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return Ok(if err.raw_os_error() == Some(libc::ENXIO) {
                Stretch::Zero(rest)
            } else {
                Stretch::Data(rest)
            });
        }
        let data = data as u64;
        if data > offset {
            return Ok(Stretch::Zero((data - offset).min(rest)));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        let len = if hole < 0 {
            rest
        } else {
            (hole as u64).saturating_sub(offset).min(rest)
        };
        Ok(Stretch::Data(len.max(1)))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                format!(
                    "reading {} at offset {offset} ({} bytes)",
                    self.path.display(),
                    buf.len()
                ),
                e,
            )
        })
    }
}

/// What the bytes from some offset of an image hold, and for how many bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stretch {
    /// May hold non-zero bytes: must be read.
    Data(u64),
    /// Known to read as zeros: never read.
    Zero(u64),
}

/// A disk image to archive: raw file, block device or qcow2 (with its
/// backing chain). One trait, so every command reads images the same way.
pub trait DiskImage: Send {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// Where it was opened from (for messages).
    fn path(&self) -> &Path;
    /// What the bytes from `offset` (< size) hold; the length is at least
    /// 1 and at most `size - offset`.
    fn status(&self, offset: u64) -> Result<Stretch>;
    /// Read exactly `buf.len()` guest bytes at `offset` (within the size).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// Refuse what is not a regular file (or, with `block`, a block device).
fn check_kind(meta: &Metadata, path: &Path, block: bool) -> Result<()> {
    let kind = meta.file_type();
    if kind.is_file() || (block && kind.is_block_device()) {
        return Ok(());
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_fifo() {
        "a pipe (FIFO)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    };
    let allowed = if block {
        "disk images are regular files or block devices"
    } else {
        "backing files are regular files"
    };
    Err(Error::Invalid(format!(
        "{} is {what}, not a disk image ({allowed})",
        path.display()
    )))
}

/// Open an image file for reading without ever blocking in `open()` and
/// without reading anything but a regular file (or, for a source the user
/// named, `follow`, a block device): `stat` first, refuse other kinds
/// (FIFOs, character devices, sockets, directories), open with
/// `O_NONBLOCK` (and `O_NOFOLLOW` unless `follow`), then check that the
/// open file is the one `stat` saw.
pub fn open_checked(path: &Path, follow: bool) -> Result<(File, Metadata)> {
    let meta = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .ctx(|| format!("opening {}", path.display()))?;
    check_kind(&meta, path, follow)?;
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .ctx(|| format!("opening {}", path.display()))?;
    let opened = file
        .metadata()
        .ctx(|| format!("inspecting {}", path.display()))?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino())
        || opened.file_type() != meta.file_type()
    {
        return Err(Error::Invalid(format!(
            "{} changed while it was being opened; try again",
            path.display()
        )));
    }
    // Reads need no O_NONBLOCK (regular files and block devices ignore it).
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok((file, opened))
}

/// How the bytes of a source image are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// The bytes as they are: the guest's disk.
    Raw,
    /// A qcow2 image: the disk its tables describe.
    Qcow2,
}

impl ImageFormat {
    /// The format named `name` (`raw`, `qcow2`).
    pub fn parse(name: &str) -> Option<ImageFormat> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// A source image opened by [`open_source`].
pub struct OpenedSource {
    /// The disk as the guest sees it.
    pub image: Box<dyn DiskImage>,
    /// How it is read.
    pub format: ImageFormat,
    /// Something the user should know (a raw source that starts like a
    /// qcow2 image).
    pub warning: Option<String>,
}

/// Open a source disk image. Its format is never guessed from its
/// contents, which the guest controls (QEMU's format probing let a guest
/// that wrote a qcow2 header into its raw disk make the host read any
/// file as its backing file, CVE-2008-2004):
///
/// - `format`, when the user gives it;
/// - otherwise a block device is raw, a regular file whose name ends in
///   `.qcow2` is qcow2 and every other file raw.
///
/// A qcow2 image's backing files are read only inside the image's own
/// directory and the `allow_backing` directories (see
/// [`crate::image::qcow2::BackingPolicy`]). A raw source whose first bytes are a
/// qcow2 magic is archived as raw all the same, with a warning.
pub fn open_source(
    path: &Path,
    format: Option<ImageFormat>,
    allow_backing: &[PathBuf],
) -> Result<OpenedSource> {
    let (file, meta) = open_checked(path, true)?;
    let named_qcow2 = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"));
    let format = format.unwrap_or(if meta.is_file() && named_qcow2 {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    });
    let mut magic = [0u8; 4];
    let looks_qcow2 =
        file.read_at(&mut magic, 0).is_ok_and(|n| n == 4) && magic == crate::format::qcow2::MAGIC;
    match format {
        ImageFormat::Raw => Ok(OpenedSource {
            image: Box::new(RawImage::open_file(file, path)?),
            format,
            warning: looks_qcow2.then(|| {
                format!(
                    "{} starts with a qcow2 header but is archived as raw, its bytes exactly (a raw disk's contents belong to its guest and are never interpreted); if it is a qcow2 image, name it format=qcow2:{}",
                    path.display(),
                    path.display()
                )
            }),
        }),
        ImageFormat::Qcow2 if !looks_qcow2 => Err(Error::Image {
            path: path.display().to_string(),
            what: format!(
                "is read as qcow2 ({}) but does not start with the qcow2 magic; to archive its bytes as they are, name it format=raw:{}",
                if named_qcow2 {
                    "its name ends in .qcow2"
                } else {
                    "as asked"
                },
                path.display()
            ),
        }),
        ImageFormat::Qcow2 => {
            let policy = crate::image::qcow2::BackingPolicy::new(path, allow_backing)?;
            Ok(OpenedSource {
                image: Box::new(crate::image::qcow2::Qcow2Image::open_file(
                    file,
                    path,
                    0,
                    &|naming: &Path, name: &str, fmt: Option<&str>, depth: usize| {
                        policy.open(naming, name, fmt, depth)
                    },
                )?),
                format,
                warning: None,
            })
        }
    }
}

/// [`open_source`] with the format told by the rule there and backing
/// files only beside the image.
pub fn open_image(path: &Path) -> Result<Box<dyn DiskImage>> {
    Ok(open_source(path, None, &[])?.image)
}

/// The next run of clusters, at or after `from`, that may hold data; the
/// clusters between `from` and the run (and after the last run) are zero.
pub(crate) fn next_data_run(
    image: &dyn DiskImage,
    from: u64,
) -> Result<Option<std::ops::Range<u64>>> {
    let cs = CLUSTER_SIZE as u64;
    let size = image.size();
    let mut pos = from * cs;
    // Skip zero stretches.
    let data_start = loop {
        if pos >= size {
            return Ok(None);
        }
        match image.status(pos)? {
            Stretch::Zero(len) => pos += len,
            Stretch::Data(_) => break pos,
        }
    };
    let start = data_start / cs;
    // Extend over data and over zeros that cover no whole cluster; adjacent
    // zero stretches count as one.
    let mut zeros_from: Option<u64> = None;
    loop {
        if let Some(z) = zeros_from {
            let boundary = z.div_ceil(cs) * cs;
            if boundary < size && pos >= (boundary + cs).min(size) {
                return Ok(Some(start..boundary / cs));
            }
        }
        if pos >= size {
            return Ok(Some(start..clusters_for(size)));
        }
        match image.status(pos)? {
            Stretch::Data(len) => {
                zeros_from = None;
                pos += len;
            }
            Stretch::Zero(len) => {
                zeros_from.get_or_insert(pos);
                pos += len;
            }
        }
    }
}

/// Feed the whole image into `drive` of `writer` in order. Zero stretches
/// become zero runs without being read (the writer hashes the leaves of
/// what it stores on its workers). `progress` is called with bytes of the
/// drive done.
pub fn copy_image(
    writer: &mut dyn ClusterWriter,
    drive: DriveId,
    image: &dyn DiskImage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let size = image.size();
    let total = clusters_for(size);
    let chunk_bytes = CHUNK_CLUSTERS as usize * CLUSTER_SIZE;
    let mut buf = vec![0u8; chunk_bytes];
    let mut next = 0u64;
    while let Some(range) = next_data_run(image, next)? {
        if range.start > next {
            writer.write_zeros(drive, next..range.start)?;
        }
        progress(range.start * CLUSTER_SIZE as u64);
        let mut c = range.start;
        while c < range.end {
            let n = (range.end - c).min(CHUNK_CLUSTERS);
            let start = c * CLUSTER_SIZE as u64;
            let len = ((c + n) * CLUSTER_SIZE as u64).min(size) - start;
            image.read_at(&mut buf[..len as usize], start)?;
            for k in 0..n {
                let cl = ClusterNo(c + k);
                let off = (k as usize) * CLUSTER_SIZE;
                let clen = cluster_len(size, cl);
                writer.write_cluster(drive, cl, &buf[off..off + clen])?;
            }
            c += n;
            progress(start + len);
        }
        next = range.end;
    }
    if total > next {
        writer.write_zeros(drive, next..total)?;
    }
    progress(size);
    Ok(())
}

/// Every run [`next_data_run`] finds, from the start (for tests and tools).
pub fn data_runs(image: &dyn DiskImage) -> Result<Vec<std::ops::Range<u64>>> {
    let mut out = Vec::new();
    let mut next = 0;
    while let Some(r) = next_data_run(image, next)? {
        next = r.end;
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sparse_file_segments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(10 << 20).unwrap();
        f.write_at(&[1u8; 100], 3 << 20).unwrap();
        drop(f);
        let img = RawImage::open(&p).unwrap();
        let data = data_runs(&img).unwrap();
        let covered: u64 = data.iter().map(|r| r.end - r.start).sum();
        assert!(data.iter().any(|r| r.contains(&48)), "{data:?}");
        // A file system with hole support reports far less than the whole file.
        assert!(covered <= 160, "{data:?}");
    }

    /// An image described by stretches, to test the run arithmetic alone.
    struct Stretches(Vec<Stretch>, PathBuf);

    impl DiskImage for Stretches {
        fn size(&self) -> u64 {
            self.0
                .iter()
                .map(|s| match s {
                    Stretch::Data(n) | Stretch::Zero(n) => *n,
                })
                .sum()
        }
        fn path(&self) -> &Path {
            &self.1
        }
        fn status(&self, offset: u64) -> Result<Stretch> {
            let mut at = 0;
            for s in &self.0 {
                let (Stretch::Data(n) | Stretch::Zero(n)) = *s;
                if offset < at + n {
                    let rest = at + n - offset;
                    return Ok(match s {
                        Stretch::Data(_) => Stretch::Data(rest),
                        Stretch::Zero(_) => Stretch::Zero(rest),
                    });
                }
                at += n;
            }
            unreachable!("offset {offset} beyond the size")
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
            unreachable!()
        }
    }

    proptest! {
        /// Runs are ordered and disjoint, cover every cluster touching data,
        /// and leave out only clusters that are wholly zero.
        #[test]
        fn runs_cover_exactly_the_data(parts in proptest::collection::vec((any::<bool>(), 1u64..300_000), 1..20)) {
            let stretches: Vec<Stretch> = parts
                .iter()
                .map(|&(d, n)| if d { Stretch::Data(n) } else { Stretch::Zero(n) })
                .collect();
            let img = Stretches(stretches.clone(), PathBuf::from("x"));
            let size = img.size();
            let runs = data_runs(&img).unwrap();
            let cs = CLUSTER_SIZE as u64;
            let mut has_data = vec![false; clusters_for(size) as usize];
            let mut at = 0;
            for s in &stretches {
                let (Stretch::Data(n) | Stretch::Zero(n)) = *s;
                if matches!(s, Stretch::Data(_)) {
                    for c in at / cs..(at + n).div_ceil(cs) {
                        has_data[c as usize] = true;
                    }
                }
                at += n;
            }
            let mut in_run = vec![false; has_data.len()];
            let mut last_end = 0;
            for r in &runs {
                prop_assert!(r.start >= last_end && r.start < r.end, "{:?}", runs);
                last_end = r.end;
                for c in r.clone() {
                    in_run[c as usize] = true;
                }
                // A run starts and ends with data.
                prop_assert!(has_data[r.start as usize] && has_data[r.end as usize - 1]);
            }
            for c in 0..has_data.len() {
                prop_assert!(!has_data[c] || in_run[c], "cluster {} has data, runs {:?}", c, runs);
            }
        }
    }
}

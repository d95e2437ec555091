//! Raw image sources (regular files and block devices): holes found with
//! SEEK_DATA/SEEK_HOLE become zero clusters without being read, data is fed
//! to the Writer in order while another thread hashes the whole drive.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::digest::Sha256;

use crate::error::{Error, IoContext, Result};
use crate::format::CLUSTER_SIZE;
use crate::types::{cluster_len, clusters_for, ClusterNo, DriveId};
use crate::writer::ClusterWriter;

/// Clusters read per request.
const CHUNK_CLUSTERS: u64 = 16;

/// A raw disk image or block device opened for reading.
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
}

/// A stretch of the image: data to read, or a hole known to be zero.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Data(std::ops::Range<u64>),
    Hole(std::ops::Range<u64>),
}

impl RawImage {
    /// Open `path` read-only; its size is the file's length (or the block device's).
    pub fn open(path: &Path) -> Result<RawImage> {
        let mut file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let meta = file
            .metadata()
            .ctx(|| format!("inspecting {}", path.display()))?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            file.seek(SeekFrom::End(0))
                .ctx(|| format!("finding the size of {}", path.display()))?
        };
        if meta.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is a directory, not a disk image",
                path.display()
            )));
        }
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Data and hole segments; everything is data where the file system
    /// cannot tell.
    fn segments(&self) -> Vec<Segment> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos: u64 = 0;
        while pos < self.size {
            // SAFETY: lseek on a file descriptor we own; no memory is touched.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    out.push(Segment::Hole(pos..self.size));
                } else {
                    out.push(Segment::Data(pos..self.size));
                }
                break;
            }
            let data = (data as u64).min(self.size);
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                self.size
            } else {
                (hole as u64).min(self.size)
            };
            if data > pos {
                out.push(Segment::Hole(pos..data));
            }
            if hole > data {
                out.push(Segment::Data(data..hole));
            } else {
                out.push(Segment::Data(data..self.size));
                break;
            }
            pos = hole;
        }
        out
    }

    /// Cluster ranges to read; the clusters between them are all zero.
    fn data_clusters(&self) -> Vec<std::ops::Range<u64>> {
        let cs = CLUSTER_SIZE as u64;
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for seg in self.segments() {
            if let Segment::Data(r) = seg {
                let c = r.start / cs..r.end.div_ceil(cs);
                match out.last_mut() {
                    Some(last) if last.end >= c.start => last.end = last.end.max(c.end),
                    _ => out.push(c),
                }
            }
        }
        out
    }
}

enum HashPiece {
    Data(Vec<u8>, usize),
    Zeros(u64),
}

/// Feed the whole image into `drive` of `writer` in order and record the
/// drive's SHA-256. `progress` is called with bytes of the drive done.
pub fn copy_raw_image(
    writer: &mut dyn ClusterWriter,
    drive: DriveId,
    image: &RawImage,
    progress: &mut dyn FnMut(u64),
) -> Result<[u8; 32]> {
    let size = image.size;
    let total = clusters_for(size);
    const BUFFERS: usize = 8;
    let chunk_bytes = CHUNK_CLUSTERS as usize * CLUSTER_SIZE;
    let (free_tx, free_rx) = crossbeam_channel::bounded::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        free_tx.send(vec![0u8; chunk_bytes]).expect("fresh channel");
    }
    let (hash_tx, hash_rx) = crossbeam_channel::bounded::<HashPiece>(BUFFERS);
    let hasher = std::thread::Builder::new()
        .name("vma-drive-hash".into())
        .spawn(move || {
            let mut sha = Sha256::new();
            let zeros = vec![0u8; 1 << 20];
            for piece in hash_rx {
                match piece {
                    HashPiece::Data(buf, len) => {
                        sha.update(&buf[..len]);
                        let _ = free_tx.send(buf);
                    }
                    HashPiece::Zeros(mut n) => {
                        while n > 0 {
                            let k = n.min(zeros.len() as u64) as usize;
                            sha.update(&zeros[..k]);
                            n -= k as u64;
                        }
                    }
                }
            }
            let digest: [u8; 32] = sha.finish();
            digest
        })
        .expect("spawning the hash thread");

    let result = (|| -> Result<()> {
        let mut next = 0u64;
        let zero_run = |writer: &mut dyn ClusterWriter, from: u64, to: u64| -> Result<()> {
            if to > from {
                writer.write_zeros(drive, from..to)?;
                let bytes =
                    (to.min(total) * CLUSTER_SIZE as u64).min(size) - from * CLUSTER_SIZE as u64;
                hash_tx
                    .send(HashPiece::Zeros(bytes))
                    .map_err(|_| Error::Invalid("hash thread stopped".into()))?;
            }
            Ok(())
        };
        for range in image.data_clusters() {
            zero_run(writer, next, range.start)?;
            progress(range.start * CLUSTER_SIZE as u64);
            let mut c = range.start;
            while c < range.end {
                let n = (range.end - c).min(CHUNK_CLUSTERS);
                let start = c * CLUSTER_SIZE as u64;
                let len = ((c + n) * CLUSTER_SIZE as u64).min(size) - start;
                let mut buf = free_rx
                    .recv()
                    .map_err(|_| Error::Invalid("hash thread stopped".into()))?;
                image
                    .file
                    .read_exact_at(&mut buf[..len as usize], start)
                    .map_err(|e| {
                        Error::io(
                            format!(
                                "reading {} at offset {start} ({len} bytes)",
                                image.path.display()
                            ),
                            e,
                        )
                    })?;
                for k in 0..n {
                    let cl = ClusterNo(c + k);
                    let off = (k as usize) * CLUSTER_SIZE;
                    let clen = cluster_len(size, cl);
                    writer.write_cluster(drive, cl, &buf[off..off + clen])?;
                }
                hash_tx
                    .send(HashPiece::Data(buf, len as usize))
                    .map_err(|_| Error::Invalid("hash thread stopped".into()))?;
                c += n;
                progress(start + len);
            }
            next = range.end;
        }
        zero_run(writer, next, total)?;
        progress(size);
        Ok(())
    })();
    drop(hash_tx);
    let digest = hasher.join().expect("hash thread");
    result?;
    writer.set_drive_digest(drive, digest)?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_segments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(10 << 20).unwrap();
        f.write_at(&[1u8; 100], 3 << 20).unwrap();
        drop(f);
        let img = RawImage::open(&p).unwrap();
        let data = img.data_clusters();
        let covered: u64 = data.iter().map(|r| r.end - r.start).sum();
        assert!(data.iter().any(|r| r.contains(&48)), "{data:?}");
        // A file system with hole support reports far less than the whole file.
        assert!(covered <= 160, "{data:?}");
    }
}

//! Drive digests of disk images (and of drives read back from archives):
//! the vma tree digest, computed on every core with holes and unallocated
//! clusters never read, or the plain SHA-256 that `sha256sum` gives.

use crate::digest::Sha256;
use crate::error::{Error, Result};
use crate::format::CLUSTER_SIZE;
use crate::pipeline::OrderedPool;
use crate::source::{next_data_run, DiskImage};
use crate::tree::{leaf, Digest, DriveTree};
use crate::types::{clusters_for, is_zero};
use crate::writer::effective_threads;

/// Clusters read and hashed per piece of work.
const CHUNK_CLUSTERS: u64 = 32;

/// A cluster's leaf, or None for an all-zero cluster (whose leaf is known).
type Leaves = Vec<Option<Digest>>;

/// The vma tree digest of `image` (see [`crate::tree`]): the image is read
/// in order on the calling thread, stretches its format knows to be zero
/// (holes, unallocated qcow2 clusters, zero runs of an archive) are never
/// read, and the leaves of what is read are hashed on `threads` workers (0:
/// one per core); all-zero clusters cost a comparison, not a hash.
/// `progress` gets the bytes done.
pub fn tree_digest(
    image: &dyn DiskImage,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<Digest> {
    let size = image.size();
    let total = clusters_for(size);
    let threads = effective_threads(threads);
    let mut pool: OrderedPool<(Vec<u8>, usize), (Vec<u8>, Leaves)> =
        OrderedPool::new(threads, threads * 2 + 2, || {
            move |(buf, len): (Vec<u8>, usize)| {
                let leaves = buf[..len]
                    .chunks(CLUSTER_SIZE)
                    .map(|c| (!is_zero(c)).then(|| leaf(c)))
                    .collect();
                (buf, leaves)
            }
        });
    let mut state = Hashing {
        tree: DriveTree::new(size),
        spare: Vec::new(),
        zeros: std::collections::VecDeque::new(),
    };
    let mut next = 0u64;
    let cs = CLUSTER_SIZE as u64;
    while let Some(range) = next_data_run(image, next)? {
        if range.start > next {
            state.zeros.push_back((next, range.start));
        }
        let mut c = range.start;
        while c < range.end {
            let n = (range.end - c).min(CHUNK_CLUSTERS);
            let start = c * cs;
            let len = (((c + n) * cs).min(size) - start) as usize;
            let mut buf = state
                .spare
                .pop()
                .unwrap_or_else(|| vec![0u8; CHUNK_CLUSTERS as usize * CLUSTER_SIZE]);
            image.read_at(&mut buf[..len], start)?;
            let st = &mut state;
            pool.submit((buf, len), |out| st.take(out))?;
            c += n;
            progress((start + len as u64).min(size));
        }
        next = range.end;
    }
    if total > next {
        state.zeros.push_back((next, total));
    }
    let st = &mut state;
    pool.finish(|out| st.take(out))?;
    state.flush_zeros()?;
    progress(size);
    if state.tree.next_cluster() != total {
        return Err(Error::Invalid(format!(
            "{}: hashed {} of {total} clusters",
            image.path().display(),
            state.tree.next_cluster()
        )));
    }
    state.tree.finish()
}

/// The tree being built from hashed chunks and the zero stretches between them.
struct Hashing {
    tree: DriveTree,
    spare: Vec<Vec<u8>>,
    /// Zero stretches (start, end) not yet added, in order.
    zeros: std::collections::VecDeque<(u64, u64)>,
}

impl Hashing {
    /// Add the zero stretches that come next.
    fn flush_zeros(&mut self) -> Result<()> {
        while let Some(&(start, end)) = self.zeros.front() {
            if self.tree.next_cluster() != start {
                break;
            }
            self.tree.push_zeros(start, end - start)?;
            self.zeros.pop_front();
        }
        Ok(())
    }

    /// Add a hashed chunk (in order) and keep its buffer.
    fn take(&mut self, (buf, leaves): (Vec<u8>, Leaves)) -> Result<()> {
        self.flush_zeros()?;
        for l in leaves {
            let c = self.tree.next_cluster();
            match l {
                Some(l) => self.tree.push_leaf(c, l)?,
                None => self.tree.push_zeros(c, 1)?,
            }
        }
        self.spare.push(buf);
        self.flush_zeros()
    }
}

/// The plain SHA-256 of every byte of `image`, zeros included (what
/// `sha256sum` of the raw image gives): one sequential stream.
pub fn sha256(image: &dyn DiskImage, progress: &mut dyn FnMut(u64)) -> Result<Digest> {
    let size = image.size();
    let mut sha = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        match image.status(pos)? {
            crate::source::Stretch::Zero(n) => {
                let end = (pos + n.max(1)).min(size);
                while pos < end {
                    let k = (end - pos).min(zeros.len() as u64) as usize;
                    sha.update(&zeros[..k]);
                    pos += k as u64;
                }
            }
            crate::source::Stretch::Data(n) => {
                let end = (pos + n.max(1)).min(size);
                while pos < end {
                    let k = (end - pos).min(buf.len() as u64) as usize;
                    image.read_at(&mut buf[..k], pos)?;
                    sha.update(&buf[..k]);
                    pos += k as u64;
                }
            }
        }
        progress(pos);
    }
    Ok(sha.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RawImage;
    use std::os::unix::fs::FileExt;

    #[test]
    fn images_hash_like_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = std::fs::File::create(&p).unwrap();
        let size = 200 * CLUSTER_SIZE as u64 + 777;
        f.set_len(size).unwrap();
        f.write_all_at(&[3u8; 100], 5 * CLUSTER_SIZE as u64 + 9)
            .unwrap();
        f.write_all_at(&[0u8; 3 * CLUSTER_SIZE], 50 * CLUSTER_SIZE as u64)
            .unwrap();
        f.write_all_at(&[7u8; 70_000], 120 * CLUSTER_SIZE as u64 - 100)
            .unwrap();
        f.write_all_at(&[9u8; 700], size - 700).unwrap();
        drop(f);
        let bytes = std::fs::read(&p).unwrap();
        let img = RawImage::open(&p).unwrap();
        for threads in [1, 2, 3] {
            assert_eq!(
                tree_digest(&img, threads, &mut |_| {}).unwrap(),
                crate::tree::digest_of_bytes(&bytes)
            );
        }
        assert_eq!(
            sha256(&img, &mut |_| {}).unwrap(),
            crate::digest::sha256(&bytes)
        );
    }
}

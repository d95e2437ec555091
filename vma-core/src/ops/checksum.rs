//! Drive digests of disk images (and of drives read back from archives):
//! the vma tree digest, computed on every core with holes and unallocated
//! clusters never read, or the plain SHA-256 that `sha256sum` gives.

use crate::digest::Sha256;
use crate::error::{Error, Result};
use crate::format::CLUSTER_SIZE;
use crate::image::source::{DiskImage, Stretch};
use crate::tree::{Digest, DriveDigestKind, DriveHash};
use crate::types::{clusters_for, is_zero};
use crate::util::pipeline::OrderedPool;
use crate::write::writer::effective_threads;

/// Clusters read and hashed per piece of work.
const CHUNK_CLUSTERS: u64 = 32;

/// A cluster's leaf, or None for an all-zero cluster (whose leaf is known).
type Leaves = Vec<Option<Digest>>;

static ZEROS: [u8; CLUSTER_SIZE] = [0; CLUSTER_SIZE];

/// A piece of work: `len` bytes of consecutive clusters in `buf`, of which
/// the byte ranges in `holes` (in order) were not read and are zeros.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
    holes: Vec<std::ops::Range<usize>>,
}

impl Chunk {
    /// The leaves of its clusters: data is hashed from the buffer, holes
    /// from a static zero block (never filled in), and a cluster whose
    /// bytes are all zero costs a comparison, not a hash.
    fn leaves(&self) -> Leaves {
        let mut out = Vec::with_capacity(self.len.div_ceil(CLUSTER_SIZE));
        let mut holes = self.holes.iter().peekable();
        let mut pieces: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
        for start in (0..self.len).step_by(CLUSTER_SIZE) {
            let end = (start + CLUSTER_SIZE).min(self.len);
            // Split the cluster into data and hole pieces.
            pieces.clear();
            let mut at = start;
            while at < end {
                while holes.peek().is_some_and(|h| h.end <= at) {
                    holes.next();
                }
                match holes.peek() {
                    Some(h) if h.start <= at => {
                        let e = h.end.min(end);
                        pieces.push((at..e, false));
                        at = e;
                    }
                    Some(h) => {
                        let e = h.start.min(end);
                        pieces.push((at..e, true));
                        at = e;
                    }
                    None => {
                        pieces.push((at..end, true));
                        at = end;
                    }
                }
            }
            let zero = pieces
                .iter()
                .all(|(r, data)| !data || is_zero(&self.buf[r.clone()]));
            out.push((!zero).then(|| {
                let mut h = Sha256::new();
                h.update(&[0x00]);
                for (r, data) in &pieces {
                    if *data {
                        h.update(&self.buf[r.clone()]);
                    } else {
                        h.update(&ZEROS[..r.len()]);
                    }
                }
                h.finish()
            }));
        }
        out
    }
}

/// The stretch of an image last asked about, so that walking it asks the
/// image (two `lseek`s for a sparse file) once per stretch.
struct Stretches<'a> {
    image: &'a dyn DiskImage,
    /// Bytes [start, end) are data (true) or zeros (false).
    current: Option<(u64, u64, bool)>,
}

impl Stretches<'_> {
    /// Where the stretch holding `pos` ends, and whether it is data.
    fn at(&mut self, pos: u64) -> Result<(u64, bool)> {
        if let Some((s, e, data)) = self.current {
            if s <= pos && pos < e {
                return Ok((e, data));
            }
        }
        let (n, data) = match self.image.status(pos)? {
            Stretch::Data(n) => (n, true),
            Stretch::Zero(n) => (n, false),
        };
        let end = (pos + n.max(1)).min(self.image.size());
        self.current = Some((pos, end, data));
        Ok((end, data))
    }
}

/// The vma tree digest of `image` (see [`crate::tree`]): the image is read
/// in order on the calling thread, stretches its format knows to be zero
/// (holes, unallocated qcow2 clusters, zero runs of an archive) are never
/// read, not even inside a cluster, and the leaves of what is read are
/// hashed on `threads` workers (0: one per core); all-zero clusters cost a
/// comparison, not a hash. `progress` gets the bytes done.
pub fn tree_digest(
    image: &dyn DiskImage,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<Digest> {
    let size = image.size();
    let total = clusters_for(size);
    let threads = effective_threads(threads);
    let mut pool: OrderedPool<Chunk, (Chunk, Leaves)> =
        OrderedPool::new(threads, threads * 2 + 2, || {
            move |chunk: Chunk| {
                let leaves = chunk.leaves();
                (chunk, leaves)
            }
        });
    let mut state = Hashing {
        tree: DriveHash::new(DriveDigestKind::Tree, size),
        spare: Vec::new(),
        zeros: std::collections::VecDeque::new(),
    };
    let mut stretches = Stretches {
        image,
        current: None,
    };
    let cs = CLUSTER_SIZE as u64;
    let mut c = 0u64;
    while c < total {
        let (end, data) = stretches.at(c * cs)?;
        if !data {
            // Clusters wholly inside the zero stretch are never read.
            let zero_end = if end >= size { total } else { end / cs };
            if zero_end > c {
                state.zeros.push_back((c, zero_end));
                c = zero_end;
                continue;
            }
        }
        // A chunk: up to CHUNK_CLUSTERS clusters from c, ending before a
        // cluster that lies wholly in a zero stretch.
        let start = c * cs;
        let mut chunk = state.spare.pop().unwrap_or_else(|| Chunk {
            buf: vec![0u8; CHUNK_CLUSTERS as usize * CLUSTER_SIZE],
            len: 0,
            holes: Vec::new(),
        });
        chunk.holes.clear();
        let limit = ((c + CHUNK_CLUSTERS) * cs).min(size);
        let mut pos = start;
        while pos < limit {
            let (end, data) = stretches.at(pos)?;
            if pos.is_multiple_of(cs) && pos > start && !data && (end >= size || end - pos >= cs) {
                break;
            }
            let next = end.min(limit);
            let piece = (pos - start) as usize..(next - start) as usize;
            if data {
                image.read_at(&mut chunk.buf[piece], pos)?;
            } else {
                match chunk.holes.last_mut() {
                    Some(h) if h.end == piece.start => h.end = piece.end,
                    _ => chunk.holes.push(piece),
                }
            }
            pos = next;
        }
        // The loop stops at a cluster boundary, or at the drive's end.
        let done = pos;
        chunk.len = (done - start) as usize;
        let st = &mut state;
        pool.submit(chunk, |out| st.take(out))?;
        progress(done);
        c = done.div_ceil(cs);
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
    tree: DriveHash,
    spare: Vec<Chunk>,
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
    fn take(&mut self, (chunk, leaves): (Chunk, Leaves)) -> Result<()> {
        self.flush_zeros()?;
        for l in leaves {
            let c = self.tree.next_cluster();
            match l {
                Some(l) => self.tree.push_leaf(c, l)?,
                None => self.tree.push_zeros(c, 1)?,
            }
        }
        self.spare.push(chunk);
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
            Stretch::Zero(n) => {
                let end = (pos + n.max(1)).min(size);
                while pos < end {
                    let k = (end - pos).min(zeros.len() as u64) as usize;
                    sha.update(&zeros[..k]);
                    pos += k as u64;
                }
            }
            Stretch::Data(n) => {
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
    use crate::image::source::RawImage;
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

    /// An image in memory whose stretches are whatever the test says:
    /// zero stretches at any byte granularity (they must read as zeros).
    struct Fake {
        bytes: Vec<u8>,
        /// (end, data) in order; the last ends at the size.
        stretches: Vec<(u64, bool)>,
        path: std::path::PathBuf,
    }

    impl DiskImage for Fake {
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn path(&self) -> &std::path::Path {
            &self.path
        }
        fn status(&self, offset: u64) -> Result<Stretch> {
            let i = self.stretches.partition_point(|&(end, _)| end <= offset);
            let (end, data) = self.stretches[i];
            Ok(if data {
                Stretch::Data(end - offset)
            } else {
                Stretch::Zero(end - offset)
            })
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let s = offset as usize;
            // Zero stretches must never be read.
            let i = self.stretches.partition_point(|&(end, _)| end <= offset);
            assert!(self.stretches[i].1, "read of a zero stretch at {offset}");
            assert!(offset + buf.len() as u64 <= self.stretches[i].0);
            buf.copy_from_slice(&self.bytes[s..s + buf.len()]);
            Ok(())
        }
    }

    /// Stretches of any length and alignment, data that holds zeros too:
    /// the digest is the one of the bytes, and zero stretches are never read.
    #[test]
    fn stretches_at_any_granularity_hash_like_their_bytes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..60 {
            let size = rnd(40 * CLUSTER_SIZE as u64) + if round % 7 == 0 { 0 } else { 1 };
            let mut bytes = vec![0u8; size as usize];
            let mut stretches = Vec::new();
            let mut pos = 0u64;
            while pos < size {
                let len = match rnd(4) {
                    0 => rnd(600) + 1,
                    1 => rnd(CLUSTER_SIZE as u64) + 1,
                    2 => CLUSTER_SIZE as u64 * (rnd(5) + 1),
                    _ => rnd(9 * CLUSTER_SIZE as u64) + 1,
                };
                let end = (pos + len).min(size);
                let data = rnd(2) == 0;
                if data && rnd(3) != 0 {
                    for b in &mut bytes[pos as usize..end as usize] {
                        *b = rnd(256) as u8;
                    }
                }
                match stretches.last_mut() {
                    Some((e, d)) if *d == data => *e = end,
                    _ => stretches.push((end, data)),
                }
                pos = end;
            }
            let want = crate::tree::digest_of_bytes(&bytes);
            let img = Fake {
                bytes,
                stretches,
                path: "fake".into(),
            };
            for threads in [1, 2] {
                assert_eq!(
                    tree_digest(&img, threads, &mut |_| {}).unwrap(),
                    want,
                    "round {round}"
                );
            }
        }
    }
}

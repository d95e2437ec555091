//! The vma tree digest of a drive: a Merkle tree over its 64 KiB clusters.
//!
//! - leaf(c) = SHA-256(0x00 || bytes of cluster c): 65 536 bytes, or the
//!   drive's partial last cluster.
//! - node(l, r) = SHA-256(0x01 || l || r).
//! - The tree over n leaves has the shape of RFC 6962's Merkle Tree Hash
//!   (<https://www.rfc-editor.org/rfc/rfc6962#section-2.1>): for n > 1 it
//!   splits at k, the largest power of two below n.
//! - drive digest = SHA-256(0x02 || le64(size) || root); a drive of size 0
//!   has root SHA-256(0x03).
//!
//! Every node over an aligned block of 2^j zero clusters is the same value
//! Z_j, so a zero run of any length costs O(log n) hashes, and leaves can be
//! computed anywhere (out of order, in parallel) and combined in cluster
//! order at the end at 32 bytes per data cluster.

use std::sync::OnceLock;

use crate::digest::Sha256;
use crate::error::{Error, Result};
use crate::format::{BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE};
use crate::types::{cluster_len, cluster_range_bytes, clusters_for, ClusterNo};

/// A leaf or node digest.
pub type Digest = [u8; 32];

/// Levels of precomputed zero subtrees (2^47 bytes / 64 KiB = 2^31 clusters).
const ZERO_LEVELS: usize = 33;

static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// leaf(bytes) = SHA-256(0x00 || bytes).
pub fn leaf(bytes: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update(&[0x00]);
    h.update(bytes);
    h.finish()
}

/// The leaf of a stored cluster: the 4 KiB blocks set in `mask` come from
/// `blocks` (in order), the others are zeros; `len` bytes of it are the
/// drive's (64 KiB, or less for a partial last cluster). Nothing is copied.
pub fn leaf_of_blocks(mask: u16, blocks: &[u8], len: usize) -> Digest {
    let mut h = Sha256::new();
    h.update(&[0x00]);
    let mut next = 0;
    for i in 0..BLOCKS_PER_CLUSTER {
        let start = i * BLOCK_SIZE;
        if start >= len {
            break;
        }
        let n = (len - start).min(BLOCK_SIZE);
        if mask & (1 << i) != 0 {
            h.update(&blocks[next * BLOCK_SIZE..next * BLOCK_SIZE + n]);
            next += 1;
        } else {
            h.update(&ZERO_BLOCK[..n]);
        }
    }
    h.finish()
}

/// node(l, r) = SHA-256(0x01 || l || r).
pub fn node(l: &Digest, r: &Digest) -> Digest {
    let mut h = Sha256::new();
    h.update(&[0x01]);
    h.update(l);
    h.update(r);
    h.finish()
}

fn zero_table() -> &'static [Digest; ZERO_LEVELS] {
    static TABLE: OnceLock<[Digest; ZERO_LEVELS]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [[0u8; 32]; ZERO_LEVELS];
        t[0] = leaf(&[0u8; CLUSTER_SIZE]);
        for j in 1..ZERO_LEVELS {
            t[j] = node(&t[j - 1], &t[j - 1]);
        }
        t
    })
}

/// Z_j: the node over 2^j zero clusters (Z_0 is the leaf of a zero cluster).
pub fn zero_subtree(j: u32) -> Digest {
    zero_table()[j as usize]
}

/// The drive digest from a tree root (see the module documentation).
pub fn drive_digest(size: u64, root: &Digest) -> Digest {
    let mut h = Sha256::new();
    h.update(&[0x02]);
    h.update(&size.to_le_bytes());
    h.update(root);
    h.finish()
}

/// The root of a drive of size 0.
pub fn empty_root() -> Digest {
    crate::digest::sha256(&[0x03])
}

/// The state digest of a point in time: SHA-256("vma-state-v1" || for each
/// drive in header order: le16(name_len) || name || le64(size) || drive
/// digest). A drive without a digest (an interrupted capture) counts as 32
/// zero bytes: such a state is no point in time, and nothing stands in for it.
pub fn state_digest<'a>(
    drives: impl IntoIterator<Item = (&'a str, u64, Option<Digest>)>,
) -> Digest {
    let mut h = Sha256::new();
    h.update(b"vma-state-v1");
    for (name, size, digest) in drives {
        h.update(&(name.len() as u16).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&size.to_le_bytes());
        h.update(&digest.unwrap_or([0; 32]));
    }
    h.finish()
}

/// The tree digest of one drive, built from its leaves in cluster order:
/// each leaf, or runs of zero clusters (which cost O(log n) each).
/// Memory is O(log n) whatever the drive size.
#[derive(Clone, Debug)]
pub struct DriveTree {
    size: u64,
    clusters: u64,
    next: u64,
    /// Perfect subtrees (level, digest), largest first.
    stack: Vec<(u32, Digest)>,
}

impl DriveTree {
    /// An empty tree for a drive of `size` bytes.
    pub fn new(size: u64) -> DriveTree {
        DriveTree {
            size,
            clusters: clusters_for(size),
            next: 0,
            stack: Vec::new(),
        }
    }

    /// The next cluster the tree expects.
    pub fn next_cluster(&self) -> u64 {
        self.next
    }

    /// The drive's number of clusters.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    fn push_subtree(&mut self, level: u32, digest: Digest) {
        self.stack.push((level, digest));
        while self.stack.len() >= 2 {
            let n = self.stack.len();
            let (lr, r) = self.stack[n - 1];
            let (ll, l) = self.stack[n - 2];
            if ll != lr {
                break;
            }
            let z = zero_subtree(ll);
            let merged = if l == z && r == z {
                zero_subtree(ll + 1)
            } else {
                node(&l, &r)
            };
            self.stack.truncate(n - 2);
            self.stack.push((ll + 1, merged));
        }
    }

    fn out_of_order(&self, cluster: u64) -> Error {
        Error::Invalid(format!(
            "drive tree: cluster {cluster} given where cluster {} (of {}) was expected",
            self.next, self.clusters
        ))
    }

    /// Add the leaf of cluster `cluster`, which must be the next one.
    pub fn push_leaf(&mut self, cluster: u64, leaf: Digest) -> Result<()> {
        if cluster != self.next || cluster >= self.clusters {
            return Err(self.out_of_order(cluster));
        }
        self.push_subtree(0, leaf);
        self.next += 1;
        Ok(())
    }

    /// Add `count` zero clusters from `cluster` on, which must be the next
    /// one. The drive's partial last cluster, if it is among them, gets
    /// the leaf of its own (shorter) zeros.
    pub fn push_zeros(&mut self, cluster: u64, count: u64) -> Result<()> {
        let end = cluster.checked_add(count).filter(|&e| e <= self.clusters);
        if cluster != self.next || end.is_none() {
            return Err(self.out_of_order(cluster));
        }
        let end = end.expect("checked");
        let partial = self.size % CLUSTER_SIZE as u64;
        let whole_end = if partial != 0 && end == self.clusters {
            end - 1
        } else {
            end
        };
        let mut p = self.next;
        while p < whole_end {
            let left = whole_end - p;
            let align = if p == 0 { 63 } else { p.trailing_zeros() };
            let fit = 63 - left.leading_zeros();
            let j = align.min(fit).min(ZERO_LEVELS as u32 - 1);
            self.push_subtree(j, zero_subtree(j));
            p += 1 << j;
        }
        self.next = whole_end;
        if whole_end < end {
            let last = self.clusters - 1;
            self.push_leaf(last, leaf(&vec![0u8; partial as usize]))?;
        }
        Ok(())
    }

    /// The root over every cluster (all must have been given).
    pub fn root(&self) -> Result<Digest> {
        if self.next != self.clusters {
            return Err(Error::Invalid(format!(
                "drive tree: {} of {} clusters given",
                self.next, self.clusters
            )));
        }
        let mut it = self.stack.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return Ok(empty_root());
        };
        for (_, d) in it {
            acc = node(d, &acc);
        }
        Ok(acc)
    }

    /// The drive digest (all clusters must have been given).
    pub fn finish(&self) -> Result<Digest> {
        Ok(drive_digest(self.size, &self.root()?))
    }
}

/// Which digest of a whole drive a [`DriveHash`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveDigestKind {
    /// The tree drive digest (3.0 archives, `vma checksum`).
    Tree,
    /// The plain SHA-256 of every byte, zeros included (2.0 archives).
    Sha256,
}

/// The one accumulator of whole-drive digests: clusters given in order as
/// data, leaves or zero runs (a zero run costs O(log n) for the tree, and
/// is hashed from a static zero block for the SHA-256); a cluster given
/// out of order is an error. Memory is O(log n) whatever the drive size.
#[derive(Clone)]
pub struct DriveHash {
    size: u64,
    inner: HashState,
}

#[derive(Clone)]
enum HashState {
    Tree(DriveTree),
    Sha256 { sha: Sha256, next: u64 },
}

static ZERO_CLUSTER: [u8; CLUSTER_SIZE] = [0; CLUSTER_SIZE];

impl DriveHash {
    /// An empty accumulator of digest `kind` for a drive of `size` bytes.
    pub fn new(kind: DriveDigestKind, size: u64) -> DriveHash {
        let inner = match kind {
            DriveDigestKind::Tree => HashState::Tree(DriveTree::new(size)),
            DriveDigestKind::Sha256 => HashState::Sha256 {
                sha: Sha256::new(),
                next: 0,
            },
        };
        DriveHash { size, inner }
    }

    /// The kind of digest it computes.
    pub fn kind(&self) -> DriveDigestKind {
        match self.inner {
            HashState::Tree(_) => DriveDigestKind::Tree,
            HashState::Sha256 { .. } => DriveDigestKind::Sha256,
        }
    }

    /// The next cluster it expects.
    pub fn next_cluster(&self) -> u64 {
        match &self.inner {
            HashState::Tree(t) => t.next_cluster(),
            HashState::Sha256 { next, .. } => *next,
        }
    }

    /// The drive's number of clusters.
    pub fn clusters(&self) -> u64 {
        clusters_for(self.size)
    }

    fn out_of_order(&self, cluster: u64) -> Error {
        Error::Invalid(format!(
            "drive digest: cluster {cluster} given where cluster {} (of {}) was expected",
            self.next_cluster(),
            self.clusters()
        ))
    }

    /// Add the bytes of cluster `cluster` (all of them: a whole cluster, or
    /// the drive's shorter last one), which must be the next one.
    pub fn push_cluster(&mut self, cluster: u64, bytes: &[u8]) -> Result<()> {
        let want = cluster_len(self.size, ClusterNo(cluster));
        if bytes.len() != want || cluster >= self.clusters() {
            return Err(Error::Invalid(format!(
                "drive digest: {} bytes given for cluster {cluster}, which holds {want}",
                bytes.len()
            )));
        }
        match &mut self.inner {
            HashState::Tree(t) => t.push_leaf(cluster, leaf(bytes)),
            HashState::Sha256 { sha, next } => {
                if cluster != *next {
                    return Err(self.out_of_order(cluster));
                }
                sha.update(bytes);
                *next += 1;
                Ok(())
            }
        }
    }

    /// Add the leaf of cluster `cluster` (tree digests only), which must
    /// be the next one.
    pub fn push_leaf(&mut self, cluster: u64, leaf: Digest) -> Result<()> {
        match &mut self.inner {
            HashState::Tree(t) => t.push_leaf(cluster, leaf),
            HashState::Sha256 { .. } => Err(Error::Invalid(
                "drive digest: a leaf given to a SHA-256 of every byte".into(),
            )),
        }
    }

    /// Add `count` zero clusters from `cluster` on, which must be the next.
    pub fn push_zeros(&mut self, cluster: u64, count: u64) -> Result<()> {
        let clusters = self.clusters();
        match &mut self.inner {
            HashState::Tree(t) => t.push_zeros(cluster, count),
            HashState::Sha256 { sha, next } => {
                let end = cluster.checked_add(count).filter(|&e| e <= clusters);
                let (true, Some(end)) = (cluster == *next, end) else {
                    return Err(self.out_of_order(cluster));
                };
                let bytes = cluster_range_bytes(self.size, cluster..end);
                let mut left = bytes.end - bytes.start;
                while left > 0 {
                    let n = left.min(CLUSTER_SIZE as u64) as usize;
                    sha.update(&ZERO_CLUSTER[..n]);
                    left -= n as u64;
                }
                *next = end;
                Ok(())
            }
        }
    }

    /// The drive digest (every cluster must have been given).
    pub fn finish(self) -> Result<Digest> {
        match self.inner {
            HashState::Tree(t) => t.finish(),
            HashState::Sha256 { sha, next } => {
                if next != clusters_for(self.size) {
                    return Err(Error::Invalid(format!(
                        "drive digest: {next} of {} clusters given",
                        clusters_for(self.size)
                    )));
                }
                Ok(sha.finish())
            }
        }
    }
}

/// The drive digest of `data` (a whole drive in memory), for tests and small tools.
pub fn digest_of_bytes(data: &[u8]) -> Digest {
    let mut t = DriveTree::new(data.len() as u64);
    for (c, chunk) in data.chunks(CLUSTER_SIZE).enumerate() {
        t.push_leaf(c as u64, leaf(chunk)).expect("in order");
    }
    t.finish().expect("complete")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 6962's MTH, written the naive way.
    fn mth(leaves: &[Digest]) -> Digest {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                node(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    /// The naive drive digest: hash every cluster, zeros included.
    fn naive(data: &[u8]) -> Digest {
        let leaves: Vec<Digest> = data.chunks(CLUSTER_SIZE).map(leaf).collect();
        drive_digest(data.len() as u64, &mth(&leaves))
    }

    #[test]
    fn known_shapes() {
        assert_eq!(
            DriveTree::new(0).finish().unwrap(),
            drive_digest(0, &empty_root())
        );
        let z = zero_subtree(0);
        assert_eq!(z, leaf(&[0u8; CLUSTER_SIZE]));
        assert_eq!(zero_subtree(1), node(&z, &z));
        // Three leaves: node(node(a, b), c).
        let data: Vec<u8> = (0..3 * CLUSTER_SIZE).map(|i| (i / 7) as u8).collect();
        let l: Vec<Digest> = data.chunks(CLUSTER_SIZE).map(leaf).collect();
        let want = drive_digest(data.len() as u64, &node(&node(&l[0], &l[1]), &l[2]));
        assert_eq!(digest_of_bytes(&data), want);
        assert_eq!(naive(&data), want);
    }

    #[test]
    fn blocks_hash_like_the_expanded_cluster() {
        let mut cluster = vec![0u8; CLUSTER_SIZE];
        cluster[4096 * 3..4096 * 4].fill(7);
        cluster[4096 * 15 + 1] = 9;
        let mut blocks = vec![7u8; 4096];
        blocks.extend_from_slice(&cluster[4096 * 15..]);
        let mask = (1 << 3) | (1 << 15);
        assert_eq!(leaf_of_blocks(mask, &blocks, CLUSTER_SIZE), leaf(&cluster));
        // A partial cluster: only `len` bytes count.
        assert_eq!(
            leaf_of_blocks(mask, &blocks, 4096 * 3 + 100),
            leaf(&cluster[..4096 * 3 + 100])
        );
    }

    /// A 128 TiB zero drive costs microseconds, and equals the naive shape
    /// (checked here on a smaller drive; the large one only for time).
    #[test]
    fn one_accumulator_for_both_drive_digests() {
        let size = 3 * CLUSTER_SIZE as u64 + 1000;
        let mut data = vec![0u8; size as usize];
        data[5] = 1;
        data[size as usize - 1] = 9;
        let feed = |kind| {
            let mut h = DriveHash::new(kind, size);
            h.push_cluster(0, &data[..CLUSTER_SIZE]).unwrap();
            h.push_zeros(1, 2).unwrap();
            h.push_cluster(3, &data[3 * CLUSTER_SIZE..]).unwrap();
            h.finish().unwrap()
        };
        assert_eq!(feed(DriveDigestKind::Tree), digest_of_bytes(&data));
        assert_eq!(feed(DriveDigestKind::Sha256), crate::digest::sha256(&data));
        for kind in [DriveDigestKind::Tree, DriveDigestKind::Sha256] {
            let mut h = DriveHash::new(kind, size);
            assert!(h.push_zeros(1, 1).is_err(), "out of order");
            assert!(h.push_zeros(0, 5).is_err(), "past the end");
            assert!(h.push_cluster(0, &data[..10]).is_err(), "short cluster");
            h.push_zeros(0, 2).unwrap();
            assert!(h.clone().finish().is_err(), "incomplete");
            assert!(h.push_cluster(3, &data[3 * CLUSTER_SIZE..]).is_err());
        }
    }

    #[test]
    fn huge_zero_drives_are_cheap() {
        let started = std::time::Instant::now();
        for _ in 0..255 {
            let mut t = DriveTree::new(crate::format::limits::MAX_DRIVE_SIZE);
            t.push_zeros(0, t.clusters()).unwrap();
            t.finish().unwrap();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let size = 37 * CLUSTER_SIZE as u64 + 1000;
        let mut t = DriveTree::new(size);
        t.push_zeros(0, 5).unwrap();
        t.push_zeros(5, t.clusters() - 5).unwrap();
        assert_eq!(t.finish().unwrap(), naive(&vec![0u8; size as usize]));
    }

    proptest! {
        /// Random sizes and random zero patterns: the streaming tree (zero
        /// runs given as runs, data clusters as leaves) equals the naive
        /// digest over every byte.
        #[test]
        fn streaming_tree_matches_the_naive_one(
            clusters in 0usize..300,
            tail in 0usize..CLUSTER_SIZE,
            pattern in proptest::collection::vec((any::<bool>(), 1usize..40), 1..30),
            seed in any::<u8>(),
        ) {
            let size = if clusters == 0 { tail as u64 } else { ((clusters - 1) * CLUSTER_SIZE + tail.max(1)) as u64 };
            let n = clusters_for(size) as usize;
            let mut data = vec![0u8; size as usize];
            let mut is_data = vec![false; n];
            let mut c = 0;
            for (i, &(d, len)) in pattern.iter().cycle().enumerate() {
                if c >= n { break; }
                for k in c..(c + len).min(n) {
                    is_data[k] = d;
                    if d {
                        let start = k * CLUSTER_SIZE;
                        let end = (start + CLUSTER_SIZE).min(data.len());
                        // Data clusters may still be all zero (a stored zero cluster).
                        if (i + k) % 5 != 0 {
                            data[start + (k * 31) % (end - start)] = seed.wrapping_add(k as u8) | 1;
                        }
                    }
                }
                c += len;
            }
            let mut t = DriveTree::new(size);
            let mut k = 0;
            while k < n {
                if is_data[k] {
                    let start = k * CLUSTER_SIZE;
                    let end = (start + CLUSTER_SIZE).min(data.len());
                    t.push_leaf(k as u64, leaf(&data[start..end])).unwrap();
                    k += 1;
                } else {
                    let mut e = k;
                    while e < n && !is_data[e] { e += 1; }
                    t.push_zeros(k as u64, (e - k) as u64).unwrap();
                    k = e;
                }
            }
            prop_assert_eq!(t.finish().unwrap(), naive(&data));
        }
    }
}

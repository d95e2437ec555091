//! Synthetic fulls: the newest point in time of a chain written as one
//! self-contained archive, streaming from the chain's extents.
//!
//! The chain's indexes say, for every cluster of every drive, which link
//! holds it at the newest point (the newest link that stores it as data or
//! zeros). A stored extent all of whose data clusters are still current is
//! appended to the output as it is stored ([`Writer::append_stored`]: no
//! decoding, no compression, a new sequence number and digest); only the
//! current clusters of extents that later links partly superseded are
//! decoded and encoded again. Zero clusters become zero runs. With
//! [`MergeOptions::drive_digests`], each drive's SHA-256 is computed on a
//! thread of its own from the decoded clusters in drive order, as `create`
//! records it.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use crate::chain::Chain;
use crate::digest::Sha256;
use crate::error::{Error, Result};
use crate::extent::{ClusterData, DecodedExtent, StoredExtent};
use crate::format::{limits, ParentRef, RunKind, BLOCK_SIZE, CLUSTER_SIZE};
use crate::pipeline::OrderedPool;
use crate::ranges::RangeSet;
use crate::stream::ArchiveFormat;
use crate::types::{cluster_len, uuid_text, ClusterNo, DriveId};
use crate::writer::{effective_threads, ArchiveMeta, Writer};

/// Decoded extents kept between the pieces of a drive that need them (for
/// the drive digest) before they are dropped and read again when needed.
const RETAIN_BYTES: u64 = 64 << 20;

/// Tuning of [`merge_chain`].
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Threads reading and checking extents (0: one per core).
    pub threads: usize,
    /// Record each drive's whole-content SHA-256. This decodes every
    /// extent (copied ones too) and hashes every logical byte, zeros
    /// included, in drive order.
    pub drive_digests: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            threads: 0,
            drive_digests: true,
        }
    }
}

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeSummary {
    /// Links of the chain read.
    pub links: usize,
    /// Extents appended as they were stored.
    pub copied_extents: u64,
    /// Data clusters in them.
    pub copied_clusters: u64,
    /// Extents partly superseded by later links, whose current clusters
    /// were decoded and encoded again.
    pub reencoded_extents: u64,
    /// Data clusters encoded again.
    pub reencoded_clusters: u64,
    /// Extents decoded once more for the drive digest (they were needed
    /// again after being dropped from the bounded set kept in memory).
    pub reread_extents: u64,
}

/// The header of the synthetic full of `chain`'s newest point: a new uuid,
/// the newest archive's time and drives, the configs of that point in
/// time (the VM configs stored in the newest archive or taken from the
/// nearest ancestor that stores them, and the newest archive's capture
/// record with its checkpoints), standing in for the newest archive (and
/// for what it stands in for itself), so archives made on top of it
/// resolve against the synthetic full.
pub fn synthetic_meta(chain: &Chain) -> ArchiveMeta {
    let newest = chain.newest();
    let h = newest.header();
    let mut meta = ArchiveMeta::new(h.drives.clone(), chain.point_configs().blobs());
    meta.ctime = h.ctime;
    if let Some(footer) = newest.footer() {
        meta.stands_for.push(ParentRef {
            uuid: h.uuid,
            digest: footer.archive_digest,
        });
    }
    meta.stands_for.extend(h.stands_for.iter().copied());
    meta.stands_for.truncate(limits::MAX_STANDS_FOR);
    meta
}

/// Write every cluster of `chain`'s newest point into `writer`, whose
/// drives must be the newest archive's (as [`synthetic_meta`] gives them),
/// and record the drives' digests if asked. The caller finishes the
/// writer. `progress` gets the logical bytes done, all drives together.
pub fn merge_chain<W: Write>(
    chain: &Arc<Chain>,
    writer: &mut Writer<W>,
    options: &MergeOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<MergeSummary> {
    chain.refuse_interrupted(|_| true)?;
    if writer.header().drives != chain.header().drives {
        return Err(Error::Invalid(
            "the merged archive must have the newest archive's drives".into(),
        ));
    }
    let plan = Arc::new(Plan::new(chain, writer, options.drive_digests)?);
    let hasher = options.drive_digests.then(|| DriveHasher::start(&plan));
    let mut exec = Exec {
        writer,
        plan: plan.clone(),
        live: HashMap::new(),
        received: 0,
        cursor: (0, 0),
        piece_seq: 0,
        done_before: 0,
        hasher: hasher.as_ref().map(|h| h.tx.clone()),
        summary: MergeSummary {
            links: chain.links().len(),
            ..Default::default()
        },
        progress,
    };
    let threads = effective_threads(options.threads);
    let mut pool = OrderedPool::new(threads, threads * 2 + 2, || {
        let chain = chain.clone();
        let plan = plan.clone();
        move |load: usize| plan.load(&chain, load)
    });
    let result = (|| -> Result<()> {
        exec.advance()?;
        for load in 0..plan.loads.len() {
            let ex = &mut exec;
            pool.submit(load, |out| ex.on_load(out))?;
        }
        let ex = &mut exec;
        pool.finish(|out| ex.on_load(out))?;
        exec.advance()?;
        debug_assert_eq!(exec.cursor.0, plan.drives.len());
        Ok(())
    })();
    drop(pool);
    exec.hasher = None;
    let summary = exec.summary.clone();
    // A hashing thread that failed explains why sending to it failed.
    let digests = hasher.map(DriveHasher::finish).transpose()?;
    result?;
    for (d, digest) in plan.drives.iter().zip(digests.into_iter().flatten()) {
        writer.set_drive_digest(d.id, digest)?;
    }
    Ok(summary)
}

/// An extent of the chain: (link, offset of the extent in it).
type ExtentKey = (usize, u64);

/// Clusters of a drive at the newest point, and the extent holding them
/// (None: they are zero).
type RawPiece = (Range<u64>, Option<ExtentKey>);

/// Where the clusters of one piece of a drive come from.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// They are zero.
    Zero,
    /// Data of an extent, delivered by load `load` (of `Plan::loads`).
    Data { load: usize },
}

/// A stretch of clusters of one drive with one source.
#[derive(Clone, Debug)]
struct Piece {
    clusters: Range<u64>,
    source: Source,
}

/// One drive of the merged archive.
struct DrivePlan {
    id: DriveId,
    size: u64,
    pieces: Vec<Piece>,
}

/// One read of an extent, in the order the drive walk needs them.
#[derive(Clone, Debug)]
struct Load {
    link: usize,
    offset: u64,
    /// The first read of this extent: it is written to the output now.
    first: bool,
    /// Appended as stored (every data cluster is current) rather than
    /// decoded and encoded again.
    copy: bool,
    /// Decode the payload (to encode it again, or for the drive digest).
    decode: bool,
    /// Data clusters the index places in this extent.
    data_clusters: u64,
    /// The last data piece (in walk order) that uses it.
    last_use: usize,
}

/// Everything decided before reading any extent.
struct Plan {
    /// Per link: its drive ids (as index) as the newest archive's.
    id_map: Vec<[Option<DriveId>; 256]>,
    /// Per link, per drive (newest order): the data clusters current from it.
    current: Vec<Vec<RangeSet>>,
    drives: Vec<DrivePlan>,
    loads: Vec<Load>,
    hash: bool,
}

impl Plan {
    fn new<W: Write>(chain: &Chain, writer: &Writer<W>, hash: bool) -> Result<Plan> {
        let links = chain.links();
        let newest = &chain.header().drives;
        let id_map: Vec<[Option<DriveId>; 256]> = links
            .iter()
            .map(|l| {
                let mut map = [None; 256];
                for d in &l.header().drives {
                    map[d.id.0 as usize] = newest.iter().find(|n| n.name == d.name).map(|n| n.id);
                }
                map
            })
            .collect();
        let mut current = vec![vec![RangeSet::new(); newest.len()]; links.len()];
        let mut drives = Vec::with_capacity(newest.len());
        // Data clusters from each extent at the newest point.
        let mut current_count: HashMap<ExtentKey, u64> = HashMap::new();
        // The raw pieces: clusters, and (link, extent offset) for data.
        let mut raw: Vec<Vec<RawPiece>> = Vec::new();
        for (slot, d) in newest.iter().enumerate() {
            let mut pieces = Vec::new();
            resolve(chain, 0, &d.name, 0..d.clusters(), &mut pieces)?;
            for (clusters, src) in &pieces {
                if let Some((link, offset)) = *src {
                    *current_count.entry((link, offset)).or_default() +=
                        clusters.end - clusters.start;
                    current[link][slot]
                        .insert(clusters.clone())
                        .map_err(|_| Error::Invalid("a cluster resolved twice".into()))?;
                }
            }
            raw.push(pieces);
            drives.push(DrivePlan {
                id: d.id,
                size: d.size,
                pieces: Vec::new(),
            });
        }
        // Data clusters each extent holds, from the indexes.
        let mut stored_count: HashMap<ExtentKey, u64> = HashMap::new();
        for (link, l) in links.iter().enumerate() {
            for r in l.index().runs.iter().filter(|r| r.kind == RunKind::Data) {
                *stored_count.entry((link, r.extent_offset)).or_default() += r.count as u64;
            }
        }
        let same_encoding: Vec<bool> = links
            .iter()
            .map(|l| {
                l.format() == ArchiveFormat::V2
                    && l.header().compression == writer.header().compression
                    && writer.accepts_codec(l.header().compression.codec)
            })
            .collect();
        // Number the data pieces in walk order and find each one's next use
        // of the same extent.
        let keys: Vec<ExtentKey> = raw.iter().flatten().filter_map(|(_, s)| *s).collect();
        let mut next_use = vec![None; keys.len()];
        let mut later: HashMap<ExtentKey, usize> = HashMap::new();
        for (g, key) in keys.iter().enumerate().rev() {
            next_use[g] = later.insert(*key, g);
        }
        let mut loads: Vec<Load> = Vec::new();
        // Extents whose decoded form is kept for later pieces: key -> load.
        let mut live: HashMap<ExtentKey, usize> = HashMap::new();
        let mut live_bytes = 0u64;
        let mut seen: HashSet<ExtentKey> = HashSet::new();
        let mut g = 0;
        for (dp, pieces) in drives.iter_mut().zip(raw) {
            for (clusters, src) in pieces {
                let source = match src {
                    None => Source::Zero,
                    Some(key) => {
                        let stored = stored_count.get(&key).copied().unwrap_or(0);
                        let load = match live.get(&key) {
                            Some(&l) => l,
                            None => {
                                let first = seen.insert(key);
                                let copy = same_encoding[key.0] && current_count[&key] == stored;
                                loads.push(Load {
                                    link: key.0,
                                    offset: key.1,
                                    first,
                                    copy,
                                    decode: hash || (first && !copy),
                                    data_clusters: stored,
                                    last_use: g,
                                });
                                live.insert(key, loads.len() - 1);
                                live_bytes += stored * CLUSTER_SIZE as u64;
                                loads.len() - 1
                            }
                        };
                        loads[load].last_use = g;
                        // Without the drive digest nothing is decoded for
                        // later pieces: the first load serves them all.
                        let release = hash && (next_use[g].is_none() || live_bytes > RETAIN_BYTES);
                        if release {
                            live.remove(&key);
                            live_bytes -= stored * CLUSTER_SIZE as u64;
                        }
                        g += 1;
                        Source::Data { load }
                    }
                };
                dp.pieces.push(Piece { clusters, source });
            }
        }
        Ok(Plan {
            id_map,
            current,
            drives,
            loads,
            hash,
        })
    }

    /// The slot (newest order) of a link's drive id.
    fn slot(&self, link: usize, drive: DriveId) -> Option<usize> {
        let id = self.id_map[link][drive.0 as usize]?;
        self.drives.iter().position(|d| d.id == id)
    }

    /// Whether cluster range `clusters` of `drive` (a link's id) is current
    /// from that link.
    fn is_current(&self, link: usize, drive: DriveId, clusters: Range<u64>) -> bool {
        self.slot(link, drive)
            .is_some_and(|s| self.current[link][s].contains(clusters))
    }

    /// Read load `i` (on a worker thread): the stored extent to append, or
    /// its decoded form, or both.
    fn load(&self, chain: &Chain, i: usize) -> Result<Loaded> {
        let load = &self.loads[i];
        let reader = &chain.links()[load.link];
        let in_archive = |e: Error| e.in_archive(reader.path());
        if reader.format() == ArchiveFormat::VmaV1 {
            let decoded = reader.extent(load.offset).map_err(in_archive)?;
            return Ok(Loaded {
                stored: None,
                decoded: Some(decoded),
            });
        }
        let mut stored = reader.stored_extent(load.offset).map_err(in_archive)?;
        // The extent must hold exactly the data clusters its index places
        // there (its entries are covered by its digest, the index by its own).
        let data: u64 = stored
            .entries()
            .iter()
            .filter(|e| e.kind == RunKind::Data)
            .map(|e| e.count as u64)
            .sum();
        if data != load.data_clusters {
            return Err(in_archive(Error::corrupt(
                load.offset,
                format!(
                    "the extent holds {data} data clusters, the index places {} there",
                    load.data_clusters
                ),
            )));
        }
        let decoded = if load.decode {
            Some(Arc::new(reader.decode_stored(&stored).map_err(in_archive)?))
        } else {
            None
        };
        let stored = if load.first && load.copy {
            for e in stored.entries().iter().filter(|e| e.kind == RunKind::Data) {
                if !self.is_current(load.link, e.drive, e.start..e.start + e.count as u64) {
                    return Err(in_archive(Error::corrupt(
                        load.offset,
                        format!(
                            "the extent holds clusters {}..{} of drive id {} where the index does not place them",
                            e.start,
                            e.start + e.count as u64,
                            e.drive
                        ),
                    )));
                }
            }
            let map = &self.id_map[load.link];
            stored.keep_data_entries(|d| map[d.0 as usize].expect("current drives are mapped"));
            Some(stored)
        } else {
            None
        };
        Ok(Loaded { stored, decoded })
    }
}

/// The clusters of drive `name` in `range` as of link `link`'s point in
/// time: zero, or data in (link, extent offset); appended to `out`.
fn resolve(
    chain: &Chain,
    link: usize,
    name: &str,
    range: Range<u64>,
    out: &mut Vec<RawPiece>,
) -> Result<()> {
    let reader = &chain.links()[link];
    let d = chain.drive_named(link, name)?;
    let runs = reader.runs(d.id);
    let mut i = runs.partition_point(|r| r.start + r.count as u64 <= range.start);
    let mut pos = range.start;
    while pos < range.end {
        let r = runs.get(i).filter(|r| r.start <= pos).ok_or_else(|| {
            Error::corrupt(
                0,
                format!("the index has no run for drive {name} cluster {pos}"),
            )
            .in_archive(reader.path())
        })?;
        let end = (r.start + r.count as u64).min(range.end);
        match r.kind {
            RunKind::Zero => push_piece(out, pos..end, None),
            RunKind::Data => push_piece(out, pos..end, Some((link, r.extent_offset))),
            RunKind::Unchanged if link + 1 < chain.links().len() => {
                resolve(chain, link + 1, name, pos..end, out)?
            }
            RunKind::Unchanged => {
                return Err(Error::Invalid(format!(
                    "{}: drive {name} clusters {pos}..{end} are unchanged from a parent (uuid {}) that is not open",
                    reader.path().display(),
                    reader.header().parent.map_or("?".into(), |p| uuid_text(&p.uuid))
                )))
            }
        }
        pos = end;
        i += 1;
    }
    Ok(())
}

fn push_piece(out: &mut Vec<RawPiece>, clusters: Range<u64>, src: Option<ExtentKey>) {
    if let Some((last, s)) = out.last_mut() {
        if *s == src && last.end == clusters.start {
            last.end = clusters.end;
            return;
        }
    }
    out.push((clusters, src));
}

/// What a worker read for one load.
struct Loaded {
    /// The extent to append as stored (first reads of copied extents).
    stored: Option<StoredExtent>,
    decoded: Option<Arc<DecodedExtent>>,
}

/// The merge in progress on the calling thread: loads arrive in order,
/// the drive walk follows as far as they allow.
struct Exec<'a, W: Write> {
    writer: &'a mut Writer<W>,
    plan: Arc<Plan>,
    /// Decoded extents still needed by later pieces, by load.
    live: HashMap<usize, Arc<DecodedExtent>>,
    /// Loads received so far.
    received: usize,
    /// Next piece: (drive, piece) index.
    cursor: (usize, usize),
    /// Data pieces walked so far.
    piece_seq: usize,
    /// Logical bytes of the drives before the cursor's.
    done_before: u64,
    hasher: Option<crossbeam_channel::Sender<HashMsg>>,
    summary: MergeSummary,
    progress: &'a mut dyn FnMut(u64),
}

impl<W: Write> Exec<'_, W> {
    fn on_load(&mut self, out: Result<Loaded>) -> Result<()> {
        let loaded = out?;
        let plan = self.plan.clone();
        let load = &plan.loads[self.received];
        if load.first {
            match (loaded.stored, &loaded.decoded) {
                (Some(stored), _) => {
                    self.summary.copied_extents += 1;
                    self.summary.copied_clusters += load.data_clusters;
                    self.writer.append_stored(stored)?;
                }
                (None, Some(decoded)) => {
                    self.summary.reencoded_extents += 1;
                    self.encode_current(load.link, decoded)?;
                }
                (None, None) => unreachable!("a first load is copied or decoded"),
            }
        } else {
            self.summary.reread_extents += 1;
        }
        if plan.hash {
            if let Some(d) = loaded.decoded {
                self.live.insert(self.received, d);
            }
        }
        self.received += 1;
        self.advance()
    }

    /// Write the current data clusters of a decoded extent of `link`.
    fn encode_current(&mut self, link: usize, ext: &DecodedExtent) -> Result<()> {
        let mut buf = vec![0u8; CLUSTER_SIZE];
        for (drive, cluster, data) in ext.data_clusters() {
            if !self.plan.is_current(link, drive, cluster.0..cluster.0 + 1) {
                continue;
            }
            let slot = self
                .plan
                .slot(link, drive)
                .expect("current drives are mapped");
            let d = &self.plan.drives[slot];
            let len = cluster_len(d.size, cluster);
            data.expand_into(&mut buf[..len]);
            self.writer.write_cluster(d.id, cluster, &buf[..len])?;
            self.summary.reencoded_clusters += 1;
        }
        Ok(())
    }

    /// Walk the drives' pieces as far as the loads received allow.
    fn advance(&mut self) -> Result<()> {
        let plan = self.plan.clone();
        let cs = CLUSTER_SIZE as u64;
        while let Some(d) = plan.drives.get(self.cursor.0) {
            let Some(piece) = d.pieces.get(self.cursor.1) else {
                if let Some(h) = &self.hasher {
                    send(h, HashMsg::End)?;
                }
                self.done_before += d.size;
                self.cursor = (self.cursor.0 + 1, 0);
                continue;
            };
            let bytes =
                (piece.clusters.start * cs).min(d.size)..(piece.clusters.end * cs).min(d.size);
            match piece.source {
                Source::Zero => {
                    self.writer.write_zeros(d.id, piece.clusters.clone())?;
                    if let Some(h) = &self.hasher {
                        send(h, HashMsg::Zeros(bytes.end - bytes.start))?;
                    }
                }
                Source::Data { load } => {
                    if load >= self.received {
                        return Ok(());
                    }
                    if let Some(h) = &self.hasher {
                        let ext = self.live.get(&load).cloned().ok_or_else(|| {
                            Error::Invalid("a decoded extent was dropped too early".into())
                        })?;
                        let l = &plan.loads[load];
                        // The extent names the drive by its link's id.
                        let drive = plan.id_map[l.link]
                            .iter()
                            .position(|m| *m == Some(d.id))
                            .map(|i| DriveId(i as u8))
                            .expect("a current drive is mapped");
                        send(
                            h,
                            HashMsg::Data {
                                ext,
                                drive,
                                clusters: piece.clusters.clone(),
                                size: d.size,
                            },
                        )?;
                    }
                    if plan.loads[load].last_use == self.piece_seq {
                        self.live.remove(&load);
                    }
                    self.piece_seq += 1;
                }
            }
            (self.progress)(self.done_before + bytes.end);
            self.cursor.1 += 1;
        }
        Ok(())
    }
}

/// Work for the drive hashing thread, in drive order.
enum HashMsg {
    /// Clusters of a decoded extent (`drive`: the extent's id for it).
    Data {
        ext: Arc<DecodedExtent>,
        drive: DriveId,
        clusters: Range<u64>,
        size: u64,
    },
    /// This many zero bytes.
    Zeros(u64),
    /// The drive is complete.
    End,
}

fn send(tx: &crossbeam_channel::Sender<HashMsg>, msg: HashMsg) -> Result<()> {
    tx.send(msg)
        .map_err(|_| Error::Invalid("the drive hashing thread stopped".into()))
}

/// The thread that hashes each drive's bytes in order.
struct DriveHasher {
    tx: crossbeam_channel::Sender<HashMsg>,
    thread: std::thread::JoinHandle<Result<Vec<[u8; 32]>>>,
}

impl DriveHasher {
    fn start(plan: &Plan) -> DriveHasher {
        let (tx, rx) = crossbeam_channel::bounded::<HashMsg>(256);
        let drives = plan.drives.len();
        let thread = std::thread::Builder::new()
            .name("vma-drive-hash".into())
            .spawn(move || {
                let zeros = vec![0u8; 1 << 20];
                let mut buf = vec![0u8; CLUSTER_SIZE];
                let mut digests = Vec::with_capacity(drives);
                let mut sha = Sha256::new();
                for msg in rx {
                    match msg {
                        HashMsg::Zeros(mut n) => {
                            while n > 0 {
                                let k = n.min(zeros.len() as u64) as usize;
                                sha.update(&zeros[..k]);
                                n -= k as u64;
                            }
                        }
                        HashMsg::Data {
                            ext,
                            drive,
                            clusters,
                            size,
                        } => {
                            for c in clusters {
                                let cluster = ClusterNo(c);
                                let len = cluster_len(size, cluster);
                                match ext.cluster(drive, cluster) {
                                    Some(ClusterData::Data { mask, blocks })
                                        if mask == u16::MAX && len == CLUSTER_SIZE =>
                                    {
                                        sha.update(&blocks[..16 * BLOCK_SIZE]);
                                    }
                                    Some(data @ ClusterData::Data { .. }) => {
                                        data.expand_into(&mut buf[..len]);
                                        sha.update(&buf[..len]);
                                    }
                                    _ => {
                                        return Err(Error::corrupt(
                                            ext.offset,
                                            format!(
                                                "the extent holds no data for cluster {c} of drive id {drive} where the index places it"
                                            ),
                                        ))
                                    }
                                }
                            }
                        }
                        HashMsg::End => {
                            digests.push(std::mem::take(&mut sha).finish());
                        }
                    }
                }
                Ok(digests)
            })
            .expect("spawning the hash thread");
        DriveHasher { tx, thread }
    }

    fn finish(self) -> Result<Vec<[u8; 32]>> {
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| Error::Invalid("the drive hashing thread panicked".into()))?
    }
}

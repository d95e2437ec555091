//! The 3.0 index: built with bounded memory from what arrives in any order
//! (extent records, run entries, leaf digests), and read page by page.
//!
//! One mechanism serves every side: the [`crate::Writer`] builds the index
//! it writes; the sequential pass (verify, extract, convert) rebuilds it
//! from the extents it decodes and compares page digests, drive records and
//! drive digests with what is stored; salvage builds it from the intact
//! extents into temporary storage and reads it paged like a stored one.
//! Completeness (every cluster exactly once), duplicate claims and
//! conflicting copies of a cluster all fall out of one ordered walk over
//! the sorted records; no per-cluster state is kept in memory.

use std::io::Write;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::format::{
    Directory, DriveInfo, DriveRecord, ExtentRecord, IndexFixed, IndexLayout, IndexRun, PageKind,
    RunKind, RunPageKey, EXTENTS_PER_PAGE, EXTENT_RECORD_LEN, INDEX_RUN_LEN, LEAF_LEN,
    LEAVES_PER_PAGE, RUNS_PER_PAGE,
};
use crate::tree::{leaf, zero_subtree, Digest, DriveDigestKind, DriveHash};
use crate::types::{
    cluster_len, cluster_range_bytes, ArchiveOffset, ClusterNo, DriveId, DriveRange, ExtentRef,
};
use crate::util::spool::{temp_file, Merge, Record, Spool};

pub mod paged;

pub use paged::{PageSource, PagedIndex};

/// What a [`LeafSource`] hands over, in cluster order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafItem {
    /// The leaf digest of the next cluster.
    Leaf(Digest),
    /// This many zero clusters follow.
    Zeros(u64),
}

/// Where leaves go, in cluster order.
pub type LeafSink<'a> = dyn FnMut(LeafItem) -> Result<()> + 'a;

/// What resolves clusters a link marks unchanged: the range, and where
/// their leaves go.
pub type ResolveUnchanged<'a> = dyn FnMut(Range<u64>, &mut LeafSink<'_>) -> Result<()> + 'a;

/// Where the leaves of clusters an incremental archive marks unchanged come
/// from: the parent chain's leaf pages (writer, verify), or the bytes a
/// sequential consumer reads back from the ancestors and produces
/// (extract), so that the drive digest of the point in time is checked end
/// to end.
pub trait LeafSource {
    /// Hand the leaves of clusters `clusters` of `drive` (as the archive
    /// being built names it) to `out`, in order: every cluster exactly
    /// once. Returns false when they cannot all be had (then that drive
    /// gets no drive digest, whatever was handed over).
    fn leaves(
        &mut self,
        drive: &DriveInfo,
        clusters: Range<u64>,
        out: &mut dyn FnMut(LeafItem) -> Result<()>,
    ) -> Result<bool>;
}

/// Memory the builder keeps before spilling to its temporary file.
pub const BUILDER_MEMORY: usize = 32 << 20;

/// Internal run kind of a damaged extent's claims (never stored).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct EntryRec {
    drive: u8,
    start: u64,
    key: ExtentRef,
    count: u32,
    kind: u8,
}

impl Record for EntryRec {
    const LEN: usize = 22;
    fn put(&self, o: &mut [u8]) {
        o[0] = self.drive;
        o[1..9].copy_from_slice(&self.start.to_le_bytes());
        o[9..17].copy_from_slice(&self.key.raw().to_le_bytes());
        o[17..21].copy_from_slice(&self.count.to_le_bytes());
        o[21] = self.kind;
    }
    fn get(b: &[u8]) -> Self {
        EntryRec {
            drive: b[0],
            start: u64::from_le_bytes(b[1..9].try_into().expect("8")),
            key: ExtentRef::from_raw(u64::from_le_bytes(b[9..17].try_into().expect("8"))),
            count: u32::from_le_bytes(b[17..21].try_into().expect("4")),
            kind: b[21],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct LeafRec {
    drive: u8,
    cluster: u64,
    key: ExtentRef,
    digest: Digest,
}

impl Record for LeafRec {
    const LEN: usize = 49;
    fn put(&self, o: &mut [u8]) {
        o[0] = self.drive;
        o[1..9].copy_from_slice(&self.cluster.to_le_bytes());
        o[9..17].copy_from_slice(&self.key.raw().to_le_bytes());
        o[17..49].copy_from_slice(&self.digest);
    }
    fn get(b: &[u8]) -> Self {
        LeafRec {
            drive: b[0],
            cluster: u64::from_le_bytes(b[1..9].try_into().expect("8")),
            key: ExtentRef::from_raw(u64::from_le_bytes(b[9..17].try_into().expect("8"))),
            digest: b[17..49].try_into().expect("32"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct ExtentRec {
    seq: u64,
    offset: ArchiveOffset,
    len: u32,
    digest: Digest,
}

impl Record for ExtentRec {
    const LEN: usize = 52;
    fn put(&self, o: &mut [u8]) {
        o[0..8].copy_from_slice(&self.seq.to_le_bytes());
        o[8..16].copy_from_slice(&self.offset.get().to_le_bytes());
        o[16..20].copy_from_slice(&self.len.to_le_bytes());
        o[20..52].copy_from_slice(&self.digest);
    }
    fn get(b: &[u8]) -> Self {
        ExtentRec {
            seq: u64::from_le_bytes(b[0..8].try_into().expect("8")),
            offset: ArchiveOffset(u64::from_le_bytes(b[8..16].try_into().expect("8"))),
            len: u32::from_le_bytes(b[16..20].try_into().expect("4")),
            digest: b[20..52].try_into().expect("32"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct RangeRec {
    drive: u8,
    start: u64,
    end: u64,
}

impl Record for RangeRec {
    const LEN: usize = 17;
    fn put(&self, o: &mut [u8]) {
        o[0] = self.drive;
        o[1..9].copy_from_slice(&self.start.to_le_bytes());
        o[9..17].copy_from_slice(&self.end.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        RangeRec {
            drive: b[0],
            start: u64::from_le_bytes(b[1..9].try_into().expect("8")),
            end: u64::from_le_bytes(b[9..17].try_into().expect("8")),
        }
    }
}

/// How extents are named by data runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKeys {
    /// By sequence number, with an extent table (3.0).
    Seq,
    /// By file offset, without an extent table (2.0, VMA v1).
    Offset,
}

/// Builds an index from records given in any order, with bounded memory.
pub struct IndexBuilder {
    drives: Vec<DriveInfo>,
    has_parent: bool,
    keys: ExtentKeys,
    with_leaves: bool,
    entries: Spool<EntryRec>,
    leaves: Spool<LeafRec>,
    extents: Spool<ExtentRec>,
    damaged: Spool<RangeRec>,
    stored: Vec<u64>,
    interrupted: Vec<bool>,
}

/// How [`IndexBuilder::finish`] treats problems.
pub struct FinishOptions<'a, 's> {
    /// Go on past problems (verify, salvage): gaps, conflicting copies and
    /// damaged ranges become zero runs and are reported; a cluster held
    /// twice with the same bytes is reported and the first copy used.
    /// Without it, the first problem is the error.
    pub lenient: bool,
    /// Where the leaves of unchanged clusters come from.
    pub source: Option<&'a mut (dyn LeafSource + 's)>,
    /// Keep the pages (to write or read them); without it only their
    /// digests are computed.
    pub keep_pages: bool,
    /// The archive's uuid (for the fixed part).
    pub uuid: [u8; 16],
    /// Called with the clusters walked so far and the total, for progress.
    pub progress: Option<&'a mut dyn FnMut(u64, u64)>,
}

/// Why a range is lost in a lenient build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lost {
    /// No extent holds it.
    Missing,
    /// Only damaged extents hold it.
    Damaged,
    /// Intact extents hold it with different bytes.
    Conflicting,
    /// A run that cannot be (unchanged without a parent).
    Invalid,
}

/// What a build produced: the index (its parts and, if kept, its pages),
/// the drive digests computed, and everything found wrong.
pub struct BuiltIndex {
    /// The fixed part.
    pub fixed: IndexFixed,
    /// One record per drive, in header order (digests as computed).
    pub records: Vec<DriveRecord>,
    /// Every page's digest.
    pub directory: Directory,
    /// Per drive (header order), the drive digest computed from the leaves,
    /// when it could be (interrupted drives and drives whose unchanged
    /// clusters had no leaf source have none).
    pub roots: Vec<Option<Digest>>,
    /// Problems found (lenient builds; a strict build fails on the first).
    pub problems: Vec<Error>,
    /// Ranges only damaged extents hold.
    pub damaged: Vec<DriveRange>,
    /// Ranges no extent holds.
    pub missing: Vec<DriveRange>,
    /// Ranges intact extents hold with different bytes.
    pub conflicting: Vec<DriveRange>,
    /// The pages, when kept: run pages, extent table, leaf pages.
    pub pages: Option<[TempStore; 3]>,
    /// Whether leaves were given (leaf pages and drive digests built).
    pub has_leaves: bool,
    runs_digest: Digest,
}

impl IndexBuilder {
    /// A builder for an archive with these drives. `keys` says how data
    /// runs name extents; `with_leaves` whether leaves are given (and leaf
    /// pages and drive digests built).
    pub fn new(
        drives: &[DriveInfo],
        has_parent: bool,
        keys: ExtentKeys,
        with_leaves: bool,
    ) -> Self {
        Self::with_memory(drives, has_parent, keys, with_leaves, BUILDER_MEMORY)
    }

    /// [`IndexBuilder::new`] with `memory` bytes before spilling.
    pub fn with_memory(
        drives: &[DriveInfo],
        has_parent: bool,
        keys: ExtentKeys,
        with_leaves: bool,
        memory: usize,
    ) -> Self {
        IndexBuilder {
            drives: drives.to_vec(),
            has_parent,
            keys,
            with_leaves,
            entries: Spool::new(memory / 4),
            leaves: Spool::new(memory / 2),
            extents: Spool::new(memory / 8),
            damaged: Spool::new(memory / 16),
            stored: vec![0; drives.len()],
            interrupted: vec![false; drives.len()],
        }
    }

    fn slot(&self, drive: DriveId) -> Option<usize> {
        self.drives.binary_search_by_key(&drive, |d| d.id).ok()
    }

    /// Where an entry's extent is, for an error message: its file offset
    /// when keys are offsets, else 0 (a sequence number is no position).
    fn offset_of(&self, key: ExtentRef) -> u64 {
        match self.keys {
            ExtentKeys::Offset => key.raw(),
            ExtentKeys::Seq => 0,
        }
    }

    /// Whether leaves are being collected.
    pub fn with_leaves(&self) -> bool {
        self.with_leaves
    }

    /// An extent: its sequence number, where it is, its length and digest.
    /// Returns how this index's runs name it (for its entries and leaves):
    /// by `seq` with an extent table, by `offset` without.
    pub fn add_extent(
        &mut self,
        seq: u64,
        offset: ArchiveOffset,
        len: u32,
        digest: Digest,
    ) -> Result<ExtentRef> {
        match self.keys {
            ExtentKeys::Seq => {
                self.extents.push(ExtentRec {
                    seq,
                    offset,
                    len,
                    digest,
                })?;
                Ok(ExtentRef::seq(seq))
            }
            ExtentKeys::Offset => Ok(ExtentRef::at(offset)),
        }
    }

    /// A run entry of an intact extent (`key`: what [`Self::add_extent`]
    /// returned for it).
    pub fn add_entry(
        &mut self,
        drive: DriveId,
        kind: RunKind,
        start: u64,
        count: u32,
        key: ExtentRef,
    ) -> Result<()> {
        self.entries.push(EntryRec {
            drive: drive.0,
            start,
            key: if kind == RunKind::Data {
                key
            } else {
                ExtentRef::NONE
            },
            count,
            kind: kind.code(),
        })
    }

    /// The leaf digest of a data cluster of the extent `key`.
    pub fn add_leaf(
        &mut self,
        drive: DriveId,
        cluster: u64,
        key: ExtentRef,
        digest: Digest,
    ) -> Result<()> {
        if self.with_leaves {
            self.leaves.push(LeafRec {
                drive: drive.0,
                cluster,
                key,
                digest,
            })?;
        }
        Ok(())
    }

    /// Clusters a damaged extent claims (lost, unless an intact extent holds them).
    pub fn add_damaged(&mut self, drive: DriveId, start: u64, count: u32) -> Result<()> {
        self.damaged.push(RangeRec {
            drive: drive.0,
            start,
            end: start + count as u64,
        })
    }

    /// Archive bytes attributed to `drive`.
    pub fn add_stored_bytes(&mut self, drive: DriveId, bytes: u64) {
        if let Some(s) = self.slot(drive) {
            self.stored[s] += bytes;
        }
    }

    /// Mark `drive` as written by an interrupted capture (no drive digest).
    pub fn set_interrupted(&mut self, drive: DriveId, interrupted: bool) {
        if let Some(s) = self.slot(drive) {
            self.interrupted[s] = interrupted;
        }
    }

    /// Whether `drive` is marked interrupted.
    pub fn is_interrupted(&self, drive: DriveId) -> bool {
        self.slot(drive).is_some_and(|s| self.interrupted[s])
    }

    /// Walk everything in order and build the index (see [`FinishOptions`]).
    pub fn finish(mut self, mut options: FinishOptions<'_, '_>) -> Result<BuiltIndex> {
        self.entries.seal()?;
        self.leaves.seal()?;
        self.extents.seal()?;
        self.damaged.seal()?;
        let mut found = Found::default();
        let conflicts = if options.lenient {
            self.classify(&mut found)?
        } else {
            Vec::new()
        };
        let total: u64 = self.drives.iter().map(|d| d.clusters()).sum();
        let mut runs = RunPages::new(options.keep_pages)?;
        let mut leaf_pages = PageWriter::new(PageKind::Leaves, options.keep_pages)?;
        let mut walk = Walk {
            b: &self,
            entries: self.entries.iter()?,
            leaves: self.leaves.iter()?,
            damaged: self.damaged.iter()?,
            conflicts: &conflicts,
            conflict_at: 0,
            lenient: options.lenient,
            found: &mut found,
        };
        let mut records = Vec::with_capacity(self.drives.len());
        let mut roots = Vec::with_capacity(self.drives.len());
        let mut done = 0u64;
        for (slot, d) in self.drives.iter().enumerate() {
            let mut rec = DriveRecord {
                stored_bytes: self.stored[slot],
                interrupted: self.interrupted[slot],
                first_run: runs.count,
                first_leaf: runs.data_before,
                ..DriveRecord::empty(d.id)
            };
            let mut tree = (self.with_leaves && !self.interrupted[slot])
                .then(|| DriveHash::new(DriveDigestKind::Tree, d.size));
            let mut pending: Option<IndexRun> = None;
            let source = &mut options.source;
            let progress = &mut options.progress;
            walk.drive(slot, d, &mut |w, piece| {
                let (kind, start, count, key) = match piece {
                    Piece::Data { start, count, key } => {
                        for c in start..start + count {
                            if let Some(l) = w.pull_leaf(d, c, key)? {
                                leaf_pages.push(&l)?;
                                if let Some(t) = &mut tree {
                                    t.push_leaf(c, l)?;
                                }
                            }
                        }
                        rec.data_clusters += count;
                        (RunKind::Data, start, count, key)
                    }
                    Piece::Zero { start, count } => {
                        if let Some(t) = &mut tree {
                            t.push_zeros(start, count)?;
                        }
                        (RunKind::Zero, start, count, ExtentRef::NONE)
                    }
                    Piece::Unchanged { start, count } => {
                        rec.unchanged = true;
                        let fed = match source {
                            Some(s) => {
                                feed_unchanged(&mut **s, d, start..start + count, tree.as_mut())?
                            }
                            None => false,
                        };
                        if !fed {
                            tree = None;
                        }
                        (RunKind::Unchanged, start, count, ExtentRef::NONE)
                    }
                    Piece::Lost { start, count } => {
                        // The point in time is not whole here: no digest.
                        tree = None;
                        (RunKind::Zero, start, count, ExtentRef::NONE)
                    }
                };
                push_run(&mut pending, &mut runs, d.id, kind, start, count, key)?;
                if let Some(p) = progress {
                    p(done + start + count, total);
                }
                Ok(())
            })?;
            if let Some(r) = pending.take() {
                runs.push(r)?;
            }
            done += d.clusters();
            rec.run_count = runs.count - rec.first_run;
            let root = match tree {
                Some(t) if t.next_cluster() == t.clusters() => Some(t.finish()?),
                _ => None,
            };
            rec.digest = root;
            roots.push(root);
            records.push(rec);
        }
        walk.unknown_drives()?;
        drop(walk);
        let (run_keys, run_store, runs_digest) = runs.finish()?;
        let (leaf_digests, leaf_store) = leaf_pages.finish()?;
        let (extent_count, extent_digests, extent_store) =
            self.extent_pages(&mut found, options.keep_pages, options.lenient)?;
        let fixed = IndexFixed {
            uuid: options.uuid,
            run_count: records.iter().map(|r| r.run_count).sum(),
            extent_count,
            leaf_count: if self.with_leaves {
                records.iter().map(|r| r.data_clusters).sum()
            } else {
                0
            },
            drive_count: self.drives.len() as u16,
            runs_per_page: RUNS_PER_PAGE,
            extents_per_page: EXTENTS_PER_PAGE,
            leaves_per_page: LEAVES_PER_PAGE,
        };
        if !options.lenient {
            if let Some(e) = found.first_error(&self.drives) {
                return Err(e);
            }
        }
        let pages = match (run_store, extent_store, leaf_store) {
            (Some(r), Some(e), Some(l)) => Some([r, e, l]),
            _ => None,
        };
        Ok(BuiltIndex {
            fixed,
            records,
            directory: Directory {
                runs: run_keys,
                extents: extent_digests,
                leaves: leaf_digests,
            },
            roots,
            problems: found.problems,
            damaged: found.damaged,
            missing: found.missing,
            conflicting: found.conflicting,
            pages,
            has_leaves: self.with_leaves,
            runs_digest,
        })
    }

    /// The extent table, dense by sequence number. Gaps (extents lost to
    /// damage) get empty records in a lenient build.
    fn extent_pages(
        &self,
        found: &mut Found,
        keep: bool,
        lenient: bool,
    ) -> Result<(u64, Vec<Digest>, Option<TempStore>)> {
        let mut pages = PageWriter::new(PageKind::Extents, keep)?;
        let mut it = self.extents.iter()?;
        let mut next = 0u64;
        let mut rec = Vec::with_capacity(EXTENT_RECORD_LEN);
        while let Some(e) = it.next_record()? {
            if e.seq < next {
                found.problem(Error::corrupt(
                    e.offset.get(),
                    format!(
                        "extent #{} appears twice (also before offset {})",
                        e.seq, e.offset
                    ),
                ));
                continue;
            }
            if e.seq > next {
                if !lenient {
                    found.problem(Error::corrupt(
                        e.offset.get(),
                        format!(
                            "extent #{} follows extent #{} (extents missing)",
                            e.seq,
                            next.wrapping_sub(1)
                        ),
                    ));
                }
                while next < e.seq {
                    rec.clear();
                    ExtentRecord {
                        offset: ArchiveOffset(0),
                        len: 0,
                        digest: [0; 32],
                    }
                    .encode(&mut rec);
                    pages.push(&rec)?;
                    next += 1;
                }
            }
            rec.clear();
            ExtentRecord {
                offset: e.offset,
                len: e.len,
                digest: e.digest,
            }
            .encode(&mut rec);
            pages.push(&rec)?;
            next += 1;
        }
        let (digests, store) = pages.finish()?;
        Ok((next, digests, store))
    }

    /// Find the clusters that two or more intact extents claim, and whether
    /// they hold the same bytes there (same leaf) or not (conflicting).
    /// Returns the conflicting ranges (drive id, start, end), sorted.
    fn classify(&self, found: &mut Found) -> Result<Vec<(u8, u64, u64)>> {
        const MAX_ACTIVE: usize = 16;
        let mut conflicts: Vec<(u8, u64, u64)> = Vec::new();
        let mut entries = self.entries.iter()?;
        let mut leaves = self.leaves.iter()?;
        for d in &self.drives {
            let n = d.clusters();
            let id = d.id.0;
            let mut active: Vec<EntryRec> = Vec::new();
            let mut pos = 0u64;
            // Overlapping ranges, reported merged: (start, end, conflicting).
            let mut report: Vec<(u64, u64, bool)> = Vec::new();
            loop {
                while let Some(e) = entries.peek()? {
                    if e.drive >= id {
                        break;
                    }
                    entries.next_record()?;
                }
                // Take the entries that start at `pos` (or, with nothing
                // active, at the next start).
                let next_start = match entries.peek()? {
                    Some(e) if e.drive == id => Some(e.start),
                    _ => None,
                };
                if active.is_empty() {
                    match next_start {
                        None => break,
                        Some(s) => pos = pos.max(s),
                    }
                }
                while let Some(e) = entries.peek()? {
                    if e.drive != id || e.start > pos {
                        break;
                    }
                    let e = entries.next_record()?.expect("peeked");
                    let end = (e.start + e.count as u64).min(n);
                    if end <= pos {
                        continue;
                    }
                    if active.len() < MAX_ACTIVE {
                        active.push(e);
                    } else {
                        // Too many copies to compare: treat as conflicting.
                        push_range(&mut report, pos, end, true);
                        push_conflict(&mut conflicts, id, pos, end);
                    }
                }
                if active.is_empty() {
                    continue;
                }
                let next_start = match entries.peek()? {
                    Some(e) if e.drive == id => e.start,
                    _ => u64::MAX,
                };
                let next_end = active
                    .iter()
                    .map(|e| (e.start + e.count as u64).min(n))
                    .min()
                    .expect("non-empty");
                let seg_end = next_start.min(next_end);
                if active.len() >= 2 {
                    self.compare_segment(
                        d,
                        &active,
                        pos,
                        seg_end,
                        &mut leaves,
                        &mut |s, e, bad| {
                            push_range(&mut report, s, e, bad);
                            if bad {
                                push_conflict(&mut conflicts, id, s, e);
                            }
                        },
                    )?;
                }
                pos = seg_end;
                active.retain(|e| (e.start + e.count as u64).min(n) > pos);
            }
            for (s, e, bad) in report {
                let range = d.range(s..e);
                found.problem(if bad {
                    Error::Conflicting {
                        what: format!("intact extents hold different bytes for {range}"),
                        ranges: vec![range],
                    }
                } else {
                    Error::Duplicate {
                        what: format!("{range} is stored twice (both copies hold the same bytes; the first is used)"),
                        ranges: vec![range],
                    }
                });
            }
        }
        Ok(conflicts)
    }

    /// Compare the claims `active` over clusters `from..to` of drive `d`;
    /// `out(start, end, conflicting)` for each stretch.
    fn compare_segment(
        &self,
        d: &DriveInfo,
        active: &[EntryRec],
        from: u64,
        to: u64,
        leaves: &mut Merge<'_, LeafRec>,
        out: &mut dyn FnMut(u64, u64, bool),
    ) -> Result<()> {
        let data = RunKind::Data.code();
        let zero = RunKind::Zero.code();
        if !active.iter().any(|e| e.kind == data) {
            let same = active.iter().all(|e| e.kind == active[0].kind);
            out(from, to, !same);
            return Ok(());
        }
        if !self.with_leaves || active.iter().any(|e| e.kind != data && e.kind != zero) {
            // Data against unchanged (or no leaves to compare): cannot be the same.
            out(from, to, true);
            return Ok(());
        }
        for c in from..to {
            // Every leaf of cluster c, whichever extent it comes from.
            let mut here: Vec<(ExtentRef, Digest)> = Vec::new();
            while let Some(l) = leaves.peek()? {
                let k = (l.drive, l.cluster);
                if k < (d.id.0, c) {
                    leaves.next_record()?;
                    continue;
                }
                if k == (d.id.0, c) {
                    let l = leaves.next_record()?.expect("peeked");
                    here.push((l.key, l.digest));
                    continue;
                }
                break;
            }
            let mut values: Vec<Digest> = Vec::with_capacity(active.len());
            for e in active {
                if e.kind == zero {
                    values.push(zero_leaf(d.size, c));
                } else if let Some(&(_, g)) = here.iter().find(|(k, _)| *k == e.key) {
                    values.push(g);
                }
            }
            let same = values.len() == active.len() && values.iter().all(|v| *v == values[0]);
            out(c, c + 1, !same);
        }
        Ok(())
    }
}

fn push_range(v: &mut Vec<(u64, u64, bool)>, s: u64, e: u64, bad: bool) {
    if let Some(last) = v.last_mut() {
        if last.1 == s && last.2 == bad {
            last.1 = e;
            return;
        }
    }
    v.push((s, e, bad));
}

fn push_conflict(v: &mut Vec<(u8, u64, u64)>, id: u8, s: u64, e: u64) {
    if let Some(last) = v.last_mut() {
        if last.0 == id && last.2 >= s {
            last.2 = last.2.max(e);
            return;
        }
    }
    v.push((id, s, e));
}

/// The leaf of zero cluster `c` of a drive of `size` bytes (the partial
/// last cluster hashes its own length).
pub fn zero_leaf(size: u64, c: u64) -> Digest {
    let len = cluster_len(size, ClusterNo(c));
    if len == crate::format::CLUSTER_SIZE {
        zero_subtree(0)
    } else {
        leaf(&vec![0u8; len])
    }
}

/// Feed the leaves of unchanged clusters from `source` into `tree` (if
/// any: a source may also do work of its own, as extraction does); false
/// when the source has none.
fn feed_unchanged(
    source: &mut dyn LeafSource,
    d: &DriveInfo,
    clusters: Range<u64>,
    mut tree: Option<&mut DriveHash>,
) -> Result<bool> {
    let end = clusters.end;
    let mut next = clusters.start;
    let ok = source.leaves(d, clusters, &mut |item| {
        match item {
            LeafItem::Leaf(l) => {
                if next >= end {
                    return Err(Error::Invalid(
                        "the leaf source gave more leaves than asked".into(),
                    ));
                }
                if let Some(t) = tree.as_deref_mut() {
                    t.push_leaf(next, l)?;
                }
                next += 1;
            }
            LeafItem::Zeros(n) => {
                if n > end - next {
                    return Err(Error::Invalid(
                        "the leaf source gave more zeros than asked".into(),
                    ));
                }
                if let Some(t) = tree.as_deref_mut() {
                    t.push_zeros(next, n)?;
                }
                next += n;
            }
        }
        Ok(())
    })?;
    if ok && next != end {
        return Err(Error::Invalid(format!(
            "the leaf source of drive {} gave clusters up to {next} of {end}",
            d.name
        )));
    }
    Ok(ok)
}

/// Problems found while walking.
#[derive(Default)]
struct Found {
    problems: Vec<Error>,
    damaged: Vec<DriveRange>,
    missing: Vec<DriveRange>,
    conflicting: Vec<DriveRange>,
}

impl Found {
    fn problem(&mut self, e: Error) {
        self.problems.push(e);
    }

    fn first_error(&mut self, drives: &[DriveInfo]) -> Option<Error> {
        if !self.missing.is_empty() {
            return Some(incomplete_from_ranges(drives, &self.missing));
        }
        if self.problems.is_empty() {
            None
        } else {
            Some(self.problems.swap_remove(0))
        }
    }

    fn lost(&mut self, d: &DriveInfo, range: Range<u64>, why: Lost) {
        let r = d.range(range);
        let list = match why {
            Lost::Missing => &mut self.missing,
            Lost::Damaged | Lost::Invalid => &mut self.damaged,
            Lost::Conflicting => &mut self.conflicting,
        };
        if let Some(last) = list.last_mut() {
            if last.drive == r.drive && last.bytes.end == r.bytes.start {
                last.bytes.end = r.bytes.end;
                return;
            }
        }
        list.push(r);
    }
}

/// One stretch of a drive in the walk.
#[derive(Clone, Copy, Debug)]
enum Piece {
    Data {
        start: u64,
        count: u64,
        key: ExtentRef,
    },
    Zero {
        start: u64,
        count: u64,
    },
    Unchanged {
        start: u64,
        count: u64,
    },
    Lost {
        start: u64,
        count: u64,
    },
}

/// The ordered walk over the sorted entries, drive by drive.
struct Walk<'a, 'b> {
    b: &'a IndexBuilder,
    entries: Merge<'a, EntryRec>,
    leaves: Merge<'a, LeafRec>,
    damaged: Merge<'a, RangeRec>,
    conflicts: &'a [(u8, u64, u64)],
    conflict_at: usize,
    lenient: bool,
    found: &'b mut Found,
}

impl Walk<'_, '_> {
    /// The leaf of data cluster `c` of extent `key` (None without leaves).
    fn pull_leaf(&mut self, d: &DriveInfo, c: u64, key: ExtentRef) -> Result<Option<Digest>> {
        if !self.b.with_leaves {
            return Ok(None);
        }
        let want = (d.id.0, c, key);
        while let Some(l) = self.leaves.peek()? {
            let k = (l.drive, l.cluster, l.key);
            if k < want {
                self.leaves.next_record()?;
                continue;
            }
            if k == want {
                let l = self.leaves.next_record()?.expect("peeked");
                return Ok(Some(l.digest));
            }
            break;
        }
        Err(Error::Invalid(format!(
            "index builder: no leaf for cluster {c} of drive {} in extent {}",
            d.name,
            key.raw()
        )))
    }

    fn report(&mut self, e: Error) -> Result<()> {
        if self.lenient {
            self.found.problem(e);
            Ok(())
        } else {
            Err(e)
        }
    }

    /// The pieces of drive `d`, in order, to `f`.
    fn drive(
        &mut self,
        _slot: usize,
        d: &DriveInfo,
        f: &mut dyn FnMut(&mut Self, Piece) -> Result<()>,
    ) -> Result<()> {
        let n = d.clusters();
        let id = d.id.0;
        self.skip_unknown(id)?;
        let mut pos = 0u64;
        while let Some(e) = self.entries.peek()?.copied() {
            if e.drive != id {
                break;
            }
            self.entries.next_record()?;
            let mut end = e.start + e.count as u64;
            let kind = RunKind::from_code(e.kind).expect("kinds come from RunKind");
            if end > n {
                let bytes = cluster_range_bytes(d.size, e.start.min(n)..n);
                self.report(Error::Corrupt {
                    offset: self.b.offset_of(e.key),
                    what: format!(
                        "a run holds clusters {}..{end} of drive {} which has only {n} (bytes {}..{} kept)",
                        e.start, d.name, bytes.start, bytes.end
                    ),
                })?;
                end = n;
            }
            if e.start >= end {
                continue;
            }
            if e.start > pos {
                self.gap(d, pos, e.start, f)?;
                pos = e.start;
            }
            if end <= pos {
                if !self.lenient {
                    return Err(duplicate(d, e.start..end));
                }
                continue;
            }
            let start = if e.start < pos {
                if !self.lenient {
                    return Err(duplicate(d, e.start..pos.min(end)));
                }
                pos
            } else {
                e.start
            };
            if kind == RunKind::Unchanged && !self.b.has_parent {
                self.report(Error::corrupt(
                    0,
                    format!("drive {}: clusters {start}..{end} are marked unchanged but the archive has no parent", d.name),
                ))?;
                self.found.lost(d, start..end, Lost::Invalid);
                f(
                    self,
                    Piece::Lost {
                        start,
                        count: end - start,
                    },
                )?;
                pos = end;
                continue;
            }
            self.emit(d, kind, start, end, e.key, f)?;
            pos = end;
        }
        if pos < n {
            self.gap(d, pos, n, f)?;
        }
        Ok(())
    }

    /// Emit `start..end` of one claim, with conflicting stretches lost.
    fn emit(
        &mut self,
        d: &DriveInfo,
        kind: RunKind,
        start: u64,
        end: u64,
        key: ExtentRef,
        f: &mut dyn FnMut(&mut Self, Piece) -> Result<()>,
    ) -> Result<()> {
        let id = d.id.0;
        let mut p = start;
        while p < end {
            while let Some(&(cd, _, ce)) = self.conflicts.get(self.conflict_at) {
                if cd < id || (cd == id && ce <= p) {
                    self.conflict_at += 1;
                } else {
                    break;
                }
            }
            let (stop, lost) = match self.conflicts.get(self.conflict_at) {
                Some(&(cd, cs, ce)) if cd == id && cs < end => {
                    if cs > p {
                        (cs, false)
                    } else {
                        (ce.min(end), true)
                    }
                }
                _ => (end, false),
            };
            let count = stop - p;
            if lost {
                // Skip the leaves of the conflicting clusters of this claim.
                if kind == RunKind::Data && self.b.with_leaves {
                    for c in p..stop {
                        let _ = self.pull_leaf(d, c, key);
                    }
                }
                self.found.lost(d, p..stop, Lost::Conflicting);
                f(self, Piece::Lost { start: p, count })?;
            } else {
                f(
                    self,
                    match kind {
                        RunKind::Data => Piece::Data {
                            start: p,
                            count,
                            key,
                        },
                        RunKind::Zero => Piece::Zero { start: p, count },
                        RunKind::Unchanged => Piece::Unchanged { start: p, count },
                    },
                )?;
            }
            p = stop;
        }
        Ok(())
    }

    /// Clusters `a..b` that no intact extent holds: damaged where a damaged
    /// extent claimed them, missing elsewhere.
    fn gap(
        &mut self,
        d: &DriveInfo,
        a: u64,
        b: u64,
        f: &mut dyn FnMut(&mut Self, Piece) -> Result<()>,
    ) -> Result<()> {
        let id = d.id.0;
        let mut p = a;
        while p < b {
            while let Some(r) = self.damaged.peek()? {
                if r.drive < id || (r.drive == id && r.end <= p) {
                    self.damaged.next_record()?;
                } else {
                    break;
                }
            }
            let (stop, why) = match self.damaged.peek()? {
                Some(r) if r.drive == id && r.start < b => {
                    if r.start > p {
                        (r.start, Lost::Missing)
                    } else {
                        (r.end.min(b), Lost::Damaged)
                    }
                }
                _ => (b, Lost::Missing),
            };
            self.found.lost(d, p..stop, why);
            if !self.lenient && why == Lost::Missing {
                // Collected; the strict build fails with all of them at the end.
            } else if !self.lenient {
                let range = d.range(p..stop);
                return Err(Error::Incomplete {
                    summary: format!(
                        "drive {} bytes {:?} are held only by damaged extents",
                        d.name, range.bytes
                    ),
                    ranges: vec![range],
                });
            }
            f(
                self,
                Piece::Lost {
                    start: p,
                    count: stop - p,
                },
            )?;
            p = stop;
        }
        Ok(())
    }

    /// Report entries of drives the header does not list, below `id`.
    fn skip_unknown(&mut self, id: u8) -> Result<()> {
        while let Some(e) = self.entries.peek()?.copied() {
            if e.drive >= id {
                break;
            }
            self.entries.next_record()?;
            self.report(Error::corrupt(
                self.b.offset_of(e.key),
                format!(
                    "a run names drive id {} which the header does not list",
                    e.drive
                ),
            ))?;
        }
        Ok(())
    }

    /// Report entries of drives past the last listed one.
    fn unknown_drives(&mut self) -> Result<()> {
        self.skip_unknown(u8::MAX)?;
        while let Some(e) = self.entries.next_record()? {
            self.report(Error::corrupt(
                0,
                format!(
                    "a run names drive id {} which the header does not list",
                    e.drive
                ),
            ))?;
        }
        Ok(())
    }
}

fn duplicate(d: &DriveInfo, clusters: Range<u64>) -> Error {
    let range = d.range(clusters);
    Error::Duplicate {
        what: format!("{range} is given twice"),
        ranges: vec![range],
    }
}

/// Append a piece to the pending canonical run, flushing it when the piece
/// does not continue it.
fn push_run(
    pending: &mut Option<IndexRun>,
    runs: &mut RunPages,
    drive: DriveId,
    kind: RunKind,
    start: u64,
    count: u64,
    key: ExtentRef,
) -> Result<()> {
    let mut start = start;
    let mut left = count;
    while left > 0 {
        if let Some(p) = pending {
            if p.kind == kind && p.extent == key && p.end() == start && p.count < u32::MAX {
                let add = left.min((u32::MAX - p.count) as u64);
                p.count += add as u32;
                start += add;
                left -= add;
                continue;
            }
            runs.push(*p)?;
        }
        let take = left.min(u32::MAX as u64);
        *pending = Some(IndexRun {
            drive,
            start,
            count: take as u32,
            kind,
            extent: key,
        });
        start += take;
        left -= take;
    }
    Ok(())
}

/// Bytes kept in memory by a [`TempStore`] before it moves to a file.
const STORE_MEMORY: usize = 8 << 20;

/// Append-only storage for index pages: in memory while small, then in an
/// unnamed temporary file.
pub enum TempStore {
    /// Held in memory.
    Mem(Vec<u8>),
    /// Held in a temporary file of this length.
    File(std::fs::File, u64),
}

impl TempStore {
    fn new() -> Self {
        TempStore::Mem(Vec::new())
    }

    /// Bytes stored.
    pub fn len(&self) -> u64 {
        match self {
            TempStore::Mem(v) => v.len() as u64,
            TempStore::File(_, n) => *n,
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if let TempStore::Mem(v) = self {
            if v.len() + bytes.len() <= STORE_MEMORY {
                v.extend_from_slice(bytes);
                return Ok(());
            }
            let f = temp_file()?;
            f.write_all_at(v, 0)
                .map_err(|e| Error::io("writing the index's temporary file", e))?;
            *self = TempStore::File(f, v.len() as u64);
        }
        if let TempStore::File(f, n) = self {
            f.write_all_at(bytes, *n)
                .map_err(|e| Error::io("writing the index's temporary file", e))?;
            *n += bytes.len() as u64;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            TempStore::Mem(v) => {
                let s = usize::try_from(offset)
                    .ok()
                    .and_then(|o| v.get(o..o.checked_add(buf.len())?))
                    .ok_or_else(|| {
                        Error::Invalid("read past the index's temporary storage".into())
                    })?;
                buf.copy_from_slice(s);
                Ok(())
            }
            TempStore::File(f, _) => f
                .read_exact_at(buf, offset)
                .map_err(|e| Error::io("reading the index's temporary file", e)),
        }
    }

    /// Copy everything to `out`.
    pub fn copy_to(&self, out: &mut dyn Write) -> Result<()> {
        match self {
            TempStore::Mem(v) => out
                .write_all(v)
                .map_err(|e| Error::io("writing the index", e)),
            TempStore::File(_, n) => {
                let mut buf = vec![0u8; 1 << 20];
                let mut at = 0;
                while at < *n {
                    let k = (*n - at).min(buf.len() as u64) as usize;
                    self.read_at(&mut buf[..k], at)?;
                    out.write_all(&buf[..k])
                        .map_err(|e| Error::io("writing the index", e))?;
                    at += k as u64;
                }
                Ok(())
            }
        }
    }
}

/// Cuts a stream of fixed-size items into pages, hashing each and keeping
/// them if asked.
struct PageWriter {
    per_page: usize,
    item_len: usize,
    buf: Vec<u8>,
    digests: Vec<Digest>,
    store: Option<TempStore>,
}

impl PageWriter {
    fn new(kind: PageKind, keep: bool) -> Result<Self> {
        let (per_page, item_len) = match kind {
            PageKind::Runs => (RUNS_PER_PAGE as usize, INDEX_RUN_LEN),
            PageKind::Extents => (EXTENTS_PER_PAGE as usize, EXTENT_RECORD_LEN),
            PageKind::Leaves => (LEAVES_PER_PAGE as usize, LEAF_LEN),
        };
        Ok(PageWriter {
            per_page,
            item_len,
            buf: Vec::with_capacity(per_page * item_len),
            digests: Vec::new(),
            store: keep.then(TempStore::new),
        })
    }

    fn push(&mut self, item: &[u8]) -> Result<()> {
        debug_assert_eq!(item.len(), self.item_len);
        self.buf.extend_from_slice(item);
        if self.buf.len() == self.per_page * self.item_len {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.digests.push(crate::digest::sha256(&self.buf));
        if let Some(s) = &mut self.store {
            s.append(&self.buf)?;
        }
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<Digest>, Option<TempStore>)> {
        self.flush()?;
        Ok((self.digests, self.store))
    }
}

/// Run pages with their directory keys.
struct RunPages {
    pages: PageWriter,
    keys: Vec<RunPageKey>,
    count: u64,
    /// Data clusters in the runs written so far (the next data run's first leaf).
    data_before: u64,
    item: Vec<u8>,
    all: crate::digest::Sha256,
}

impl RunPages {
    fn new(keep: bool) -> Result<Self> {
        Ok(RunPages {
            pages: PageWriter::new(PageKind::Runs, keep)?,
            keys: Vec::new(),
            count: 0,
            data_before: 0,
            item: Vec::with_capacity(INDEX_RUN_LEN),
            all: crate::digest::Sha256::new(),
        })
    }

    fn push(&mut self, r: IndexRun) -> Result<()> {
        if self.count.is_multiple_of(RUNS_PER_PAGE as u64) {
            self.keys.push(RunPageKey {
                drive: r.drive,
                start: r.start,
                first_leaf: self.data_before,
                digest: [0; 32],
            });
        }
        self.item.clear();
        r.encode(&mut self.item);
        self.pages.push(&self.item)?;
        self.all.update(&self.item);
        self.count += 1;
        if r.kind == RunKind::Data {
            self.data_before += r.count as u64;
        }
        Ok(())
    }

    fn finish(self) -> Result<(Vec<RunPageKey>, Option<TempStore>, Digest)> {
        let mut keys = self.keys;
        let (digests, store) = self.pages.finish()?;
        for (k, d) in keys.iter_mut().zip(digests) {
            k.digest = d;
        }
        Ok((keys, store, self.all.finish()))
    }
}

impl BuiltIndex {
    /// Whether damage, gaps or conflicts lost any bytes of drive `drive`
    /// (then its drive digest cannot be checked).
    pub fn lost_any_of(&self, drive: DriveId) -> bool {
        self.damaged
            .iter()
            .chain(&self.missing)
            .chain(&self.conflicting)
            .any(|r| r.drive == drive)
    }

    /// SHA-256 over every run as encoded, in order (what a 2.0 index's runs
    /// are compared with).
    pub fn runs_digest(&self) -> Digest {
        self.runs_digest
    }

    /// The layout of the index area.
    pub fn layout(&self) -> IndexLayout {
        self.fixed.layout().expect("counts of a built index fit")
    }

    /// The drive records as stored.
    pub fn records_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.records.len() * crate::format::DRIVE_RECORD_LEN);
        for r in &self.records {
            r.encode(&mut out);
        }
        out
    }

    /// The directory as stored.
    pub fn directory_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.directory.encode(&mut out);
        out
    }

    /// The index digest.
    pub fn index_digest(&self) -> Digest {
        crate::format::index_digest(
            &self.fixed.encode(),
            &self.records_bytes(),
            &self.directory_bytes(),
        )
    }

    /// Write the whole index area (the pages must have been kept); returns
    /// its length and the index digest.
    pub fn write_to(&self, out: &mut dyn Write) -> Result<(u64, Digest)> {
        let pages = self
            .pages
            .as_ref()
            .ok_or_else(|| Error::Invalid("the index was built without its pages".into()))?;
        let w = |out: &mut dyn Write, b: &[u8]| {
            out.write_all(b)
                .map_err(|e| Error::io("writing the index", e))
        };
        let fixed = self.fixed.encode();
        w(out, &fixed)?;
        for p in pages {
            p.copy_to(out)?;
        }
        let records = self.records_bytes();
        let directory = self.directory_bytes();
        w(out, &records)?;
        w(out, &directory)?;
        let digest = crate::format::index_digest(&fixed, &records, &directory);
        w(out, &digest)?;
        let len = self.layout().len;
        debug_assert_eq!(
            len,
            (fixed.len() + records.len() + directory.len() + 32) as u64
                + pages.iter().map(|p| p.len()).sum::<u64>()
        );
        Ok((len, digest))
    }
}

/// The error for drive byte ranges no extent holds: per drive how many of
/// how many clusters are missing, and where.
pub(crate) fn incomplete_from_ranges(drives: &[DriveInfo], ranges: &[DriveRange]) -> Error {
    let cs = crate::format::CLUSTER_SIZE as u64;
    let mut parts = Vec::new();
    for d in drives {
        let mine: Vec<DriveRange> = ranges.iter().filter(|r| r.drive == d.id).cloned().collect();
        if mine.is_empty() {
            continue;
        }
        let bytes: u64 = mine.iter().map(|r| r.bytes.end - r.bytes.start).sum();
        let clusters: u64 = mine
            .iter()
            .map(|r| r.bytes.end.div_ceil(cs) - r.bytes.start / cs)
            .sum();
        let at: Vec<String> = mine
            .iter()
            .take(3)
            .map(|r| format!("{}..{}", r.bytes.start, r.bytes.end))
            .collect();
        let more = match mine.len() {
            n if n > 3 => format!(" and {} more ranges", n - 3),
            _ => String::new(),
        };
        parts.push(format!(
            "drive {} lacks {clusters} of its {} clusters ({} missing), at bytes {}{more}",
            d.name,
            d.clusters(),
            crate::util::human_bytes(bytes),
            at.join(", ")
        ));
    }
    Error::Incomplete {
        summary: parts.join("; "),
        ranges: ranges.to_vec(),
    }
}

#[cfg(test)]
mod tests;

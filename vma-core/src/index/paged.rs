//! Reading a 3.0 index page by page: the fixed part, drive records and
//! directory stay in memory (small: tens of bytes per page), pages are
//! loaded on demand through small caches and checked against their digest
//! in the directory when loaded, and against the drive records and their
//! neighbours' keys. Memory does not grow with runs, extents or leaves.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::format::{
    Directory, DriveInfo, DriveRecord, ExtentRecord, IndexLayout, IndexRun, PageKind, RunKind,
    EXTENT_RECORD_LEN, INDEX_RUN_LEN, LEAF_LEN, MIN_EXTENT_LEN,
};
use crate::tree::{Digest, DriveDigestKind, DriveHash};
use crate::types::ExtentRef;

use super::{ExtentKeys, LeafItem, LeafSink, ResolveUnchanged, TempStore};

/// Run pages kept decoded in memory.
const RUN_PAGES_CACHED: usize = 48;
/// Extent-table pages kept in memory.
const EXTENT_PAGES_CACHED: usize = 16;
/// Leaf pages kept in memory.
const LEAF_PAGES_CACHED: usize = 16;

/// Where an index's pages are read from.
#[derive(Clone)]
pub enum PageSource {
    /// The archive file; the index area starts at `base`.
    File {
        /// The archive.
        file: crate::storage::Source,
        /// Offset of the index area.
        base: u64,
    },
    /// Pages a build kept (salvage): run pages, extent table, leaf pages.
    Built(Arc<[TempStore; 3]>),
}

/// A decoded run page.
struct RunPage {
    runs: Vec<IndexRun>,
    /// Per run: index of its first cluster's leaf (data runs).
    first_leaf: Vec<u64>,
}

/// Where in the run pages a drive's runs are found from a cluster on
/// (see [`PagedIndex::find_run`]).
struct RunSpot {
    /// The run page's number.
    page_no: u64,
    page: Arc<RunPage>,
    /// The first run of the page that does not end before the cluster.
    at: usize,
    /// The end of the drive's runs in this page.
    end: usize,
}

/// A tiny LRU of pages by number.
struct Lru<T> {
    cap: usize,
    items: Vec<(u64, Arc<T>)>,
}

impl<T> Lru<T> {
    fn new(cap: usize) -> Self {
        Lru {
            cap,
            items: Vec::new(),
        }
    }

    fn get(&mut self, k: u64) -> Option<Arc<T>> {
        let i = self.items.iter().position(|(x, _)| *x == k)?;
        let item = self.items.remove(i);
        let v = item.1.clone();
        self.items.push(item);
        Some(v)
    }

    fn put(&mut self, k: u64, v: Arc<T>) {
        if self.items.iter().any(|(x, _)| *x == k) {
            return;
        }
        if self.items.len() >= self.cap {
            self.items.remove(0);
        }
        self.items.push((k, v));
    }
}

/// A 3.0 index (stored, or built by salvage) read page by page.
pub struct PagedIndex {
    layout: IndexLayout,
    directory: Directory,
    records: Vec<DriveRecord>,
    drives: Vec<DriveInfo>,
    has_parent: bool,
    keys: ExtentKeys,
    /// Where extents may lie (header end .. index start).
    data: Range<u64>,
    source: PageSource,
    /// What to call the index in messages (the archive's path).
    name: String,
    runs: Mutex<Lru<RunPage>>,
    extents: Mutex<Lru<Vec<ExtentRecord>>>,
    leaves: Mutex<Lru<Vec<u8>>>,
}

impl PagedIndex {
    /// Absolute file offset of byte `rel` of the index area (for messages;
    /// an index salvage built in temporary storage has no place in the
    /// archive, and names offset 0).
    fn offset_of(&self, rel: u64) -> u64 {
        match &self.source {
            PageSource::File { base, .. } => base + rel,
            PageSource::Built(_) => 0,
        }
    }

    /// An index of `layout` whose directory and records are in memory,
    /// checked against each other and against the header's `drives`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layout: IndexLayout,
        directory: Directory,
        records: Vec<DriveRecord>,
        drives: &[DriveInfo],
        has_parent: bool,
        keys: ExtentKeys,
        data: Range<u64>,
        source: PageSource,
        name: &str,
    ) -> Result<PagedIndex> {
        let at = match &source {
            PageSource::File { base, .. } => *base,
            PageSource::Built(_) => 0,
        };
        let bad = |what: String| Error::corrupt(at, format!("index: {what}"));
        if records.len() != drives.len() || records.iter().zip(drives).any(|(r, d)| r.drive != d.id)
        {
            return Err(bad("drive records do not match the header's drives".into()));
        }
        let mut runs = 0u64;
        let mut leaves = 0u64;
        for (r, d) in records.iter().zip(drives) {
            if r.first_run != runs || r.first_leaf != leaves {
                return Err(bad(format!(
                    "drive {}: its runs or leaves do not follow the previous drive's",
                    d.name
                )));
            }
            if (r.run_count == 0) != (d.clusters() == 0)
                || r.run_count > d.clusters()
                || r.data_clusters > d.clusters()
            {
                return Err(bad(format!(
                    "drive {}: {} runs and {} data clusters cannot cover its {} clusters",
                    d.name,
                    r.run_count,
                    r.data_clusters,
                    d.clusters()
                )));
            }
            runs += r.run_count;
            leaves += r.data_clusters;
        }
        let f = &layout.fixed;
        if runs != f.run_count || (f.leaf_count != 0 && leaves != f.leaf_count) {
            return Err(bad(format!(
                "the drive records count {runs} runs and {leaves} data clusters, the fixed part {} and {}",
                f.run_count, f.leaf_count
            )));
        }
        if keys == ExtentKeys::Seq
            && f.extent_count > (data.end.saturating_sub(data.start)) / MIN_EXTENT_LEN
        {
            return Err(bad(format!(
                "{} extents cannot fit between offsets {} and {}",
                f.extent_count, data.start, data.end
            )));
        }
        let mut index = PagedIndex {
            layout,
            directory,
            records,
            drives: drives.to_vec(),
            has_parent,
            keys,
            data,
            source,
            name: name.to_string(),
            runs: Mutex::new(Lru::new(RUN_PAGES_CACHED)),
            extents: Mutex::new(Lru::new(EXTENT_PAGES_CACHED)),
            leaves: Mutex::new(Lru::new(LEAF_PAGES_CACHED)),
        };
        // Each run page's key names its first run's drive, in order.
        let per = f.runs_per_page as u64;
        let mut last = None;
        for (i, k) in index.directory.runs.iter().enumerate() {
            let owner = index.owner(i as u64 * per);
            if owner.map(|s| index.records[s].drive) != Some(k.drive)
                || last.is_some_and(|l| l >= (k.drive, k.start))
            {
                return Err(bad(format!(
                    "the directory key of run page {i} is out of place"
                )));
            }
            last = Some((k.drive, k.start));
        }
        index.records.shrink_to_fit();
        Ok(index)
    }

    /// The layout.
    pub fn layout(&self) -> &IndexLayout {
        &self.layout
    }

    /// The drive records, in header order.
    pub fn records(&self) -> &[DriveRecord] {
        &self.records
    }

    /// The directory.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Number of extents in the extent table.
    pub fn extent_count(&self) -> u64 {
        self.layout.fixed.extent_count
    }

    /// Whether leaf pages are present.
    pub fn has_leaves(&self) -> bool {
        self.layout.fixed.leaf_count > 0 || self.records.iter().all(|r| r.data_clusters == 0)
    }

    /// The slot of the drive that owns run number `g`.
    fn owner(&self, g: u64) -> Option<usize> {
        let i = self
            .records
            .partition_point(|r| r.first_run + r.run_count <= g);
        self.records
            .get(i)
            .filter(|r| r.first_run <= g && r.run_count > 0)
            .map(|_| i)
    }

    fn read_page(&self, kind: PageKind, i: u64) -> Result<Vec<u8>> {
        let (rel, len, items) = self.layout.page(kind, i);
        if items == 0 {
            return Err(Error::corrupt(
                self.offset_of(0),
                format!("index: no {} {i}", kind.name()),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        let at = self.layout.region_at(kind) + rel;
        match &self.source {
            PageSource::File { file, base } => {
                file.read_range(&mut buf, base + at).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Error::truncated(
                            base + at,
                            format!("{} ends inside {} {i} of the index", self.name, kind.name()),
                        )
                    } else {
                        Error::io(format!("reading {} at offset {}", self.name, base + at), e)
                    }
                })?
            }
            PageSource::Built(stores) => {
                let s = match kind {
                    PageKind::Runs => &stores[0],
                    PageKind::Extents => &stores[1],
                    PageKind::Leaves => &stores[2],
                };
                s.read_at(&mut buf, rel)?;
            }
        }
        let want = self.directory.digest(kind, i).ok_or_else(|| {
            Error::corrupt(
                self.offset_of(self.layout.directory_at),
                format!("index: no directory entry for {} {i}", kind.name()),
            )
        })?;
        if !crate::digest::check_matches(&want, &crate::digest::sha256(&buf)) {
            let offset = self.offset_of(at);
            return Err(Error::corrupt(
                offset,
                format!(
                    "{} {i} of the index does not match its digest in the directory (the file was changed or damaged after it was opened, or the index is damaged)",
                    kind.name()
                ),
            ));
        }
        Ok(buf)
    }

    fn run_page(&self, i: u64) -> Result<Arc<RunPage>> {
        if let Some(p) = self.runs.lock().expect("page cache").get(i) {
            return Ok(p);
        }
        let page = Arc::new(self.load_run_page(i)?);
        self.runs.lock().expect("page cache").put(i, page.clone());
        Ok(page)
    }

    /// Decode run page `i` and check it: every run in place (its drive
    /// owns its number, it continues the previous run or starts its drive
    /// at 0, the last run of a drive ends at the drive's end), its kinds
    /// and extents valid, its first key and leaf numbers as the directory says.
    fn load_run_page(&self, i: u64) -> Result<RunPage> {
        let bytes = self.read_page(PageKind::Runs, i)?;
        let per = self.layout.fixed.runs_per_page as u64;
        let key = self.directory.runs[i as usize];
        let at = match &self.source {
            PageSource::File { base, .. } => {
                base + self.layout.runs_at + i * per * INDEX_RUN_LEN as u64
            }
            PageSource::Built(_) => 0,
        };
        let bad = |what: String| Error::corrupt(at, format!("index: run page {i}: {what}"));
        let mut runs = Vec::with_capacity(bytes.len() / INDEX_RUN_LEN);
        let mut first_leaf = Vec::with_capacity(runs.capacity());
        let mut leaf = key.first_leaf;
        let mut prev: Option<IndexRun> = None;
        for (k, b) in bytes.chunks_exact(INDEX_RUN_LEN).enumerate() {
            let g = i * per + k as u64;
            let r = IndexRun::decode(b, at + (k * INDEX_RUN_LEN) as u64)?;
            let slot = self
                .owner(g)
                .ok_or_else(|| bad(format!("run {g} belongs to no drive")))?;
            let rec = &self.records[slot];
            let d = &self.drives[slot];
            if r.drive != rec.drive {
                return Err(bad(format!(
                    "run {g} names drive id {} but belongs to drive {}",
                    r.drive, d.name
                )));
            }
            let want_start = if g == rec.first_run {
                if rec.first_leaf != leaf {
                    return Err(bad(format!(
                        "drive {} starts at leaf {leaf}, its record says {}",
                        d.name, rec.first_leaf
                    )));
                }
                0
            } else if let Some(p) = prev {
                p.end()
            } else {
                key.start
            };
            if k == 0 && (r.drive != key.drive || r.start != key.start) {
                return Err(bad(
                    "its first run is not the one its directory key names".into()
                ));
            }
            if r.start != want_start || r.end() > d.clusters() {
                return Err(bad(format!(
                    "run {g} (drive {} clusters {}..{}) overlaps another, leaves a gap, or lies past the drive's end",
                    d.name,
                    r.start,
                    r.end()
                )));
            }
            if g + 1 == rec.first_run + rec.run_count && r.end() != d.clusters() {
                return Err(bad(format!(
                    "the runs of drive {} end at cluster {} of {}",
                    d.name,
                    r.end(),
                    d.clusters()
                )));
            }
            match r.kind {
                RunKind::Data => {
                    let ok = match self.keys {
                        ExtentKeys::Seq => r.extent.raw() < self.layout.fixed.extent_count,
                        ExtentKeys::Offset => self.data.contains(&r.extent.raw()),
                    };
                    if !ok {
                        return Err(bad(format!(
                            "run {g} names extent {} which does not exist",
                            r.extent.raw()
                        )));
                    }
                }
                RunKind::Unchanged if !self.has_parent || !rec.unchanged => {
                    return Err(bad(format!(
                        "run {g} is unchanged but the archive has no parent, or the drive's record says it has no unchanged runs"
                    )));
                }
                _ if r.extent != ExtentRef::NONE => {
                    return Err(bad(format!("run {g} holds no data but names an extent")));
                }
                _ => {}
            }
            first_leaf.push(leaf);
            if r.kind == RunKind::Data {
                leaf += r.count as u64;
            }
            prev = Some(r);
            runs.push(r);
        }
        // The page's data clusters end where the next page's leaves begin.
        let next_leaf = match self.directory.runs.get(i as usize + 1) {
            Some(n) => n.first_leaf,
            None => self.records.iter().map(|r| r.data_clusters).sum(),
        };
        if leaf != next_leaf {
            return Err(bad(format!(
                "its data runs end at leaf {leaf}, the next page starts at {next_leaf}"
            )));
        }
        if let (Some(last), Some(next)) = (prev, self.directory.runs.get(i as usize + 1)) {
            if next.drive == last.drive && next.start != last.end() {
                return Err(bad(
                    "its last run does not meet the next page's first".into()
                ));
            }
        }
        Ok(RunPage { runs, first_leaf })
    }

    /// Where the runs of drive `slot` from the one holding `cluster` on
    /// start: in which run page and at which run of it (the first of the
    /// drive's runs there that does not end before `cluster`). None when
    /// the drive has no runs or `cluster` lies past its end.
    fn find_run(&self, slot: usize, cluster: u64) -> Result<Option<RunSpot>> {
        let Some(rec) = self.records.get(slot) else {
            return Ok(None);
        };
        if rec.run_count == 0 || cluster >= self.drives[slot].clusters() {
            return Ok(None);
        }
        let per = self.layout.fixed.runs_per_page as u64;
        let first_page = rec.first_run / per;
        let last_page = (rec.first_run + rec.run_count - 1) / per;
        // The last page of the drive whose key is at or before the cluster.
        let keys = &self.directory.runs[first_page as usize + 1..=last_page as usize];
        let n = keys.partition_point(|k| k.drive != rec.drive || k.start <= cluster);
        let page_no = first_page + n as u64;
        let page = self.run_page(page_no)?;
        let lo = rec.first_run.saturating_sub(page_no * per) as usize;
        let hi =
            ((rec.first_run + rec.run_count).min((page_no + 1) * per) - page_no * per) as usize;
        let at = lo + page.runs[lo..hi].partition_point(|r| r.end() <= cluster);
        Ok(Some(RunSpot {
            page_no,
            page,
            at,
            end: hi,
        }))
    }

    /// The run of drive `slot` holding `cluster`, with the leaf number of
    /// its first cluster.
    pub fn run_at(&self, slot: usize, cluster: u64) -> Result<Option<(IndexRun, u64)>> {
        let Some(RunSpot { page, at, end, .. }) = self.find_run(slot, cluster)? else {
            return Ok(None);
        };
        match page.runs[..end].get(at) {
            Some(r) if r.start <= cluster => Ok(Some((*r, page.first_leaf[at]))),
            _ => Err(Error::corrupt(
                self.offset_of(self.layout.runs_at),
                format!(
                    "index: no run holds cluster {cluster} of drive {}",
                    self.drives[slot].name
                ),
            )),
        }
    }

    /// The runs of drive `slot` from the one holding `cluster` on.
    pub fn runs_from(&self, slot: usize, cluster: u64) -> Result<RunCursor<'_>> {
        let Some(RunSpot {
            page_no, page, at, ..
        }) = self.find_run(slot, cluster)?
        else {
            return Ok(RunCursor::empty(self));
        };
        let rec = &self.records[slot];
        Ok(RunCursor {
            index: self,
            next: page_no * self.layout.fixed.runs_per_page as u64 + at as u64,
            end: rec.first_run + rec.run_count,
            page: Some((page_no, page)),
        })
    }

    /// The extent-table record of the extent a run names by `key` (its
    /// sequence number), checked to lie between the header and the index
    /// and to be long enough.
    pub fn extent_record(&self, key: ExtentRef) -> Result<ExtentRecord> {
        let seq = key.raw();
        let f = &self.layout.fixed;
        if self.keys != ExtentKeys::Seq || seq >= f.extent_count {
            return Err(Error::corrupt(
                self.offset_of(self.layout.extents_at),
                format!("index: no extent #{seq}"),
            ));
        }
        let per = f.extents_per_page as u64;
        let page_no = seq / per;
        let cached = self.extents.lock().expect("page cache").get(page_no);
        let page = match cached {
            Some(p) => p,
            None => {
                let bytes = self.read_page(PageKind::Extents, page_no)?;
                let recs: Vec<ExtentRecord> = bytes
                    .chunks_exact(EXTENT_RECORD_LEN)
                    .map(ExtentRecord::decode)
                    .collect();
                let p = Arc::new(recs);
                self.extents
                    .lock()
                    .expect("page cache")
                    .put(page_no, p.clone());
                p
            }
        };
        let r = page[(seq - page_no * per) as usize];
        let end = r.offset.checked_add(r.len as u64);
        if (r.len as u64) < MIN_EXTENT_LEN
            || r.offset.get() < self.data.start
            || end.is_none_or(|e| e.get() > self.data.end)
        {
            return Err(Error::corrupt(
                self.offset_of(self.layout.extents_at + seq * EXTENT_RECORD_LEN as u64),
                format!(
                    "index: extent #{seq} is recorded at {}+{}, outside the extents ({}..{})",
                    r.offset, r.len, self.data.start, self.data.end
                ),
            ));
        }
        Ok(r)
    }

    fn leaf_page(&self, page_no: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(p) = self.leaves.lock().expect("page cache").get(page_no) {
            return Ok(p);
        }
        let p = Arc::new(self.read_page(PageKind::Leaves, page_no)?);
        self.leaves
            .lock()
            .expect("page cache")
            .put(page_no, p.clone());
        Ok(p)
    }

    /// Leaf number `n` (of the data clusters in index order).
    pub fn leaf(&self, n: u64) -> Result<Digest> {
        if n >= self.layout.fixed.leaf_count {
            return Err(Error::corrupt(
                self.offset_of(self.layout.leaves_at),
                format!("index: no leaf {n}"),
            ));
        }
        let per = self.layout.fixed.leaves_per_page as u64;
        let page = self.leaf_page(n / per)?;
        let at = ((n % per) as usize) * LEAF_LEN;
        Ok(page[at..at + LEAF_LEN].try_into().expect("32"))
    }

    /// The leaf of data cluster `cluster` of drive `slot`.
    pub fn leaf_of(&self, slot: usize, cluster: u64) -> Result<Digest> {
        match self.run_at(slot, cluster)? {
            Some((r, first)) if r.kind == RunKind::Data => self.leaf(first + cluster - r.start),
            _ => Err(Error::corrupt(
                self.offset_of(self.layout.runs_at),
                format!(
                    "index: cluster {cluster} of drive {} holds no data",
                    self.drives[slot].name
                ),
            )),
        }
    }

    /// Hand the leaves of clusters `clusters` of drive `slot` to `out` in
    /// order: leaf pages for data, zero runs as zeros. Unchanged clusters
    /// are given to `unchanged` (the caller resolves them further).
    pub fn leaves_of(
        &self,
        slot: usize,
        clusters: Range<u64>,
        out: &mut LeafSink<'_>,
        unchanged: &mut ResolveUnchanged<'_>,
    ) -> Result<()> {
        let mut pos = clusters.start;
        let mut cursor = self.runs_from(slot, pos)?;
        while pos < clusters.end {
            let (r, first) = cursor.next_with_leaf()?.ok_or_else(|| {
                Error::corrupt(
                    self.offset_of(self.layout.runs_at),
                    format!(
                        "index: drive {} has no run at cluster {pos}",
                        self.drives[slot].name
                    ),
                )
            })?;
            let end = r.end().min(clusters.end);
            match r.kind {
                RunKind::Zero => out(LeafItem::Zeros(end - pos))?,
                RunKind::Unchanged => unchanged(pos..end, out)?,
                RunKind::Data => {
                    for c in pos..end {
                        out(LeafItem::Leaf(self.leaf(first + c - r.start)?))?;
                    }
                }
            }
            pos = end;
        }
        Ok(())
    }

    /// Recompute every drive's digest from the runs and leaf pages and
    /// compare it with the drive records: what proves the leaves of a
    /// stand-in (O(index pages) of I/O). Drives with unchanged runs or
    /// without a recorded digest cannot be proven.
    pub fn prove_digests(&self) -> Result<()> {
        for (slot, d) in self.drives.iter().enumerate() {
            let rec = &self.records[slot];
            let Some(want) = rec.digest else {
                return Err(Error::Invalid(format!(
                    "{}: drive {} has no drive digest to prove its leaves against",
                    self.name, d.name
                )));
            };
            let mut tree = DriveHash::new(DriveDigestKind::Tree, d.size);
            self.leaves_of(
                slot,
                0..d.clusters(),
                &mut |item| match item {
                    LeafItem::Leaf(l) => tree.push_leaf(tree.next_cluster(), l),
                    LeafItem::Zeros(n) => tree.push_zeros(tree.next_cluster(), n),
                },
                &mut |r, _| {
                    Err(Error::Invalid(format!(
                        "{}: drive {} clusters {}..{} are unchanged from a parent: a stand-in must be a full archive",
                        self.name, d.name, r.start, r.end
                    )))
                },
            )?;
            let got = tree.finish()?;
            if got != want {
                return Err(Error::DriveDigestMismatch {
                    drive_name: d.name.clone(),
                    expected: hex::encode(want),
                    found: hex::encode(got),
                });
            }
        }
        Ok(())
    }
}

/// Runs of one drive in order, page by page.
pub struct RunCursor<'a> {
    index: &'a PagedIndex,
    next: u64,
    end: u64,
    page: Option<(u64, Arc<RunPage>)>,
}

impl<'a> RunCursor<'a> {
    fn empty(index: &'a PagedIndex) -> Self {
        RunCursor {
            index,
            next: 0,
            end: 0,
            page: None,
        }
    }

    /// The next run and the leaf number of its first cluster.
    pub fn next_with_leaf(&mut self) -> Result<Option<(IndexRun, u64)>> {
        if self.next >= self.end {
            return Ok(None);
        }
        let per = self.index.layout.fixed.runs_per_page as u64;
        let page_no = self.next / per;
        let page = match &self.page {
            Some((n, p)) if *n == page_no => p.clone(),
            _ => {
                let p = self.index.run_page(page_no)?;
                self.page = Some((page_no, p.clone()));
                p
            }
        };
        let k = (self.next - page_no * per) as usize;
        self.next += 1;
        Ok(Some((page.runs[k], page.first_leaf[k])))
    }
}

impl Iterator for RunCursor<'_> {
    type Item = Result<IndexRun>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_with_leaf()
            .transpose()
            .map(|r| r.map(|(run, _)| run))
    }
}

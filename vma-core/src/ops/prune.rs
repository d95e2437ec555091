//! Retention: which archives of a set to keep, which one to replace by a
//! synthetic full and which to delete so that the newest points in time
//! stay restorable and nothing that remains loses a link.
//!
//! The archives form chains (each incremental's parent is in the set). The
//! newest `keep` points in time (archives that are not interrupted
//! captures), by creation time, are kept together with every newer link of
//! their chains. In each chain the oldest kept point, if it is
//! incremental, is replaced by a synthetic full of its point in time
//! (which stands in for it, so the links above it still resolve), and the
//! links below it are deleted; a chain with no kept point is deleted
//! whole. Before anything is deleted, every archive that stays (the
//! archives beside the set included, and archives still being written)
//! must still find its parent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::atomic::StaleTemporary;
use crate::chain::configs::point_configs;
use crate::chain::{claims_to_stand_in, is_exactly, Chain};
use crate::error::{Error, Result};
use crate::format::{ConfigBlob, Header, ParentRef};
use crate::ops::merge::{write_synthetic_full, MergeOptions, MergeSummary};
use crate::ops::output::{verify_written, ArchiveOutput};
use crate::read::detect::{detect, DetectedFormat, DETECT_LEN};
use crate::read::reader::Reader;
use crate::read::stream::{ArchiveFormat, ArchiveStream};
use crate::storage;
use crate::types::uuid_text;
use crate::util::ProgressFn;
use crate::write::writer::WriterOptions;

/// One chain of the set and what happens to it.
#[derive(Debug)]
pub struct ChainPlan {
    /// Its archives, oldest (the full) first.
    pub links: Vec<PathBuf>,
    /// The oldest kept point, to be replaced by a synthetic full of its
    /// point in time; None when nothing is folded.
    pub fold: Option<PathBuf>,
    /// The archives folded into it or no longer needed, newest first (the
    /// order in which they are deleted, so that what is left of a chain
    /// stays a chain should deleting stop half way).
    pub delete: Vec<PathBuf>,
    /// The archives kept as they are, oldest first.
    pub keep: Vec<PathBuf>,
}

/// What pruning a set of archives does.
#[derive(Debug)]
pub struct PrunePlan {
    /// Every chain, in the order of their fulls' paths.
    pub chains: Vec<ChainPlan>,
}

impl PrunePlan {
    /// Whether anything would change.
    pub fn is_empty(&self) -> bool {
        self.chains
            .iter()
            .all(|c| c.fold.is_none() && c.delete.is_empty())
    }
}

/// The config blobs of one kept point in time (an archive path).
pub type PointConfigList = Vec<(PathBuf, Vec<ConfigBlob>)>;

/// The config blobs of every point in time `plan` keeps (the fold and the
/// kept archives), each resolved with its ancestors among `archives`.
/// Taken before a prune changes anything, for [`check_configs_kept`].
pub fn kept_point_configs(plan: &PrunePlan, archives: &[PathBuf]) -> Result<PointConfigList> {
    let mut out = Vec::new();
    for c in &plan.chains {
        out.extend(chain_point_configs(c, archives)?);
    }
    Ok(out)
}

/// The configs of each kept point of one chain: its newest kept archive's
/// chain is opened once, and each kept link's point resolved in it.
fn chain_point_configs(c: &ChainPlan, archives: &[PathBuf]) -> Result<PointConfigList> {
    let Some(tip) = c.keep.last().or(c.fold.as_ref()) else {
        return Ok(Vec::new());
    };
    let chain = Chain::open(tip, archives).map_err(|e| e.in_archive(tip))?;
    let links = chain.links();
    let mut out = Vec::new();
    for (i, link) in links.iter().enumerate() {
        let path = link.path().to_path_buf();
        if c.fold.as_ref() == Some(&path) || c.keep.contains(&path) {
            let configs = point_configs(link.header(), &links[i + 1..]).blobs();
            out.push((path, configs));
        }
    }
    Ok(out)
}

/// Refuse, after the folds were written and before anything is deleted,
/// if a kept point in time of `plan` would lose a config blob: each must
/// have the same configs when resolved among `remaining` (the archives
/// that stay) as it had before (`before`, from [`kept_point_configs`]).
pub fn check_configs_kept(
    plan: &PrunePlan,
    before: &PointConfigList,
    remaining: &[PathBuf],
) -> Result<()> {
    let mut now = PointConfigList::new();
    for c in &plan.chains {
        now.extend(chain_point_configs(c, remaining)?);
    }
    for (path, configs) in before {
        let after = now.iter().find(|(p, _)| p == path).map(|(_, c)| c);
        for c in configs {
            if !after.is_some_and(|a| a.contains(c)) {
                return Err(Error::Invalid(format!(
                    "{}: its point in time would lose the config {:?}, whose only copy is in an archive this prune would delete; nothing was deleted",
                    path.display(),
                    c.name
                )));
            }
        }
    }
    Ok(())
}

/// The archives of directory `dir` a prune works on: every file that is a
/// native or VMA v1 archive (by its magic), except hidden files (names
/// starting with `.`, where archives being written live), sorted.
pub fn archives_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in files_in(dir)? {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && is_archive(&path) {
            out.push(path);
        }
    }
    Ok(out)
}

/// Plan the pruning of `archives` down to the newest `keep` points in
/// time. `beside` are the other files (of the archives' directories) whose
/// parents must survive too; only their headers are read.
pub fn plan_prune(archives: &[PathBuf], keep: usize, beside: &[PathBuf]) -> Result<PrunePlan> {
    if keep == 0 {
        return Err(Error::Invalid(
            "--keep-last must keep at least one point in time".into(),
        ));
    }
    let readers: Vec<Reader> = archives
        .iter()
        .map(|p| Reader::open(p).map_err(|e| e.in_archive(p)))
        .collect::<Result<_>>()?;
    for (i, p) in archives.iter().enumerate() {
        let canon = |q: &Path| std::fs::canonicalize(q).unwrap_or_else(|_| q.to_path_buf());
        let same = |q: &PathBuf| canon(q) == canon(p);
        if archives[..i].iter().any(same) {
            return Err(Error::Invalid(format!("{} is given twice", p.display())));
        }
    }
    // Each archive's parent within the set (the archive itself preferred
    // to a stand-in for it).
    let mut parent_of: Vec<Option<usize>> = vec![None; readers.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); readers.len()];
    for (i, r) in readers.iter().enumerate() {
        let Some(want) = r.header().parent else {
            continue;
        };
        let exact = readers.iter().position(|p| is_exactly(p, &want));
        let found = exact.or_else(|| readers.iter().position(|p| claims_to_stand_in(p, &want)));
        let Some(j) = found else {
            return Err(Error::Invalid(format!(
                "{} needs its parent (uuid {}), which is not among the archives to prune: the chain is broken",
                r.path().display(),
                uuid_text(&want.uuid)
            )));
        };
        parent_of[i] = Some(j);
        children[j].push(i);
    }
    for (j, c) in children.iter().enumerate() {
        if c.len() > 1 {
            return Err(Error::Invalid(format!(
                "{} is the parent of both {} and {}: prune works on chains without branches (fold branched chains with `vma merge`)",
                readers[j].path().display(),
                readers[c[0]].path().display(),
                readers[c[1]].path().display()
            )));
        }
    }
    // Chains, full first.
    let mut chains: Vec<Vec<usize>> = Vec::new();
    let mut placed = 0;
    for root in (0..readers.len()).filter(|&i| parent_of[i].is_none()) {
        let mut chain = vec![root];
        while let Some(&c) = children[*chain.last().expect("non-empty")].first() {
            chain.push(c);
        }
        placed += chain.len();
        chains.push(chain);
    }
    if placed != readers.len() {
        return Err(Error::Invalid(
            "the archives' parents form a loop: they are no chain".into(),
        ));
    }
    // The newest `keep` points in time over all chains.
    let interrupted = |i: usize| readers[i].drive_records().iter().any(|d| d.interrupted);
    let mut points: Vec<(i64, usize, usize)> = Vec::new();
    for chain in &chains {
        for (pos, &i) in chain.iter().enumerate() {
            if !interrupted(i) {
                points.push((readers[i].header().ctime, pos, i));
            }
        }
    }
    points.sort_by(|a, b| b.cmp(a));
    let kept: Vec<usize> = points.iter().take(keep).map(|p| p.2).collect();
    let mut plans = Vec::new();
    let mut replaced: Vec<usize> = Vec::new();
    let mut deleted: Vec<usize> = Vec::new();
    for chain in &chains {
        let paths = |ids: &[usize]| ids.iter().map(|&i| archives[i].clone()).collect::<Vec<_>>();
        let oldest_kept = chain.iter().position(|i| kept.contains(i));
        let (fold, keep_from, delete): (Option<usize>, usize, Vec<usize>) = match oldest_kept {
            None => (None, chain.len(), chain.iter().rev().copied().collect()),
            Some(0) => (None, 0, Vec::new()),
            Some(k) => (
                Some(chain[k]),
                k + 1,
                chain[..k].iter().rev().copied().collect(),
            ),
        };
        replaced.extend(fold);
        deleted.extend(&delete);
        plans.push(ChainPlan {
            links: paths(chain),
            fold: fold.map(|i| archives[i].clone()),
            delete: paths(&delete),
            keep: paths(&chain[keep_from..]),
        });
    }
    check_nothing_needed(&readers, &replaced, &deleted, beside, archives)?;
    Ok(PrunePlan { chains: plans })
}

/// Refuse the plan if an archive that stays (in the set or beside it)
/// names as its parent an archive that would be deleted, unless a
/// synthetic full that replaces a kept point stands in for it.
fn check_nothing_needed(
    readers: &[Reader],
    replaced: &[usize],
    deleted: &[usize],
    beside: &[PathBuf],
    archives: &[PathBuf],
) -> Result<()> {
    // What the deleted archives answered to, and what the synthetic fulls
    // will (a replaced point's identity and what it stood in for).
    let identities = |i: usize| {
        let r = &readers[i];
        identity_of(r)
            .into_iter()
            .chain(r.header().stands_for.iter().copied())
            .collect::<Vec<_>>()
    };
    let gone: Vec<(ParentRef, usize)> = deleted
        .iter()
        .flat_map(|&i| identities(i).into_iter().map(move |id| (id, i)))
        .collect();
    let mut remaining: Vec<ParentRef> = replaced.iter().flat_map(|&i| identities(i)).collect();
    let mut stays: Vec<(PathBuf, Header)> = Vec::new();
    // A replaced point becomes a full: it needs no parent any more.
    for (i, r) in readers.iter().enumerate() {
        if !deleted.contains(&i) && !replaced.contains(&i) {
            remaining.extend(identities(i));
            stays.push((archives[i].clone(), r.header().clone()));
        }
    }
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let in_set: Vec<PathBuf> = archives.iter().map(|p| canonical(p)).collect();
    for path in beside {
        if in_set.contains(&canonical(path)) {
            continue;
        }
        // Only the header: files being written have nothing more yet.
        if let Some(header) = read_header(path) {
            if let Some(footer_id) = full_identity(path) {
                remaining.push(footer_id);
            }
            remaining.extend(header.stands_for.iter().copied());
            stays.push((path.clone(), header));
        }
    }
    for (path, header) in &stays {
        let Some(want) = header.parent else {
            continue;
        };
        if let Some(&(_, d)) = gone.iter().find(|(id, _)| id.same_archive(&want)) {
            if !remaining.iter().any(|r| r.same_archive(&want)) {
                return Err(Error::Invalid(format!(
                    "{} needs {} (uuid {}) as its parent, which this prune would delete; prune it together with its chain",
                    path.display(),
                    readers[d].path().display(),
                    uuid_text(&want.uuid)
                )));
            }
        }
    }
    Ok(())
}

/// How children name `r` as their parent (3.0: uuid, archive digest
/// recomputed and state digest; 2.0: uuid and footer digest).
fn identity_of(r: &Reader) -> Option<ParentRef> {
    match r.format() {
        ArchiveFormat::V3 => r.identity().ok(),
        ArchiveFormat::V2 => Some(ParentRef {
            uuid: r.header().uuid,
            digest: r.archive_digest()?,
            state: None,
        }),
        ArchiveFormat::VmaV1 => None,
    }
}

/// The identity of a complete archive file, if it is one.
fn full_identity(path: &Path) -> Option<ParentRef> {
    identity_of(&Reader::open(path).ok()?)
}

/// The header of a native archive file, complete or still being written.
fn read_header(path: &Path) -> Option<Header> {
    let file = crate::storage::open(path).ok()?;
    let len = file.size().ok()?;
    let input = crate::storage::SeqRead::new(file, 0, len);
    ArchiveStream::open(input, &path.display().to_string())
        .ok()
        .map(|s| s.header().clone())
}

/// Whether `path` starts like a native or (uncompressed) VMA v1 archive.
fn is_archive(path: &Path) -> bool {
    let mut magic = [0u8; DETECT_LEN];
    let n = crate::storage::open(path)
        .ok()
        .and_then(|f| f.read_some(&mut magic, 0).ok())
        .unwrap_or(0);
    matches!(
        detect(&magic[..n]),
        Some(DetectedFormat::Native | DetectedFormat::VmaV1)
    )
}

/// Regular files in `dir`, sorted.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(remote) = crate::storage::remote_for(dir) {
        let mut files = remote.list(dir)?;
        files.sort();
        return Ok(files);
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// What a prune says as it goes ([`execute_prune`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum PruneEvent<'a> {
    /// The synthetic full that replaces `path` was written, checked and
    /// renamed into place.
    Folded {
        /// The archive replaced.
        path: &'a Path,
        /// What the merge did.
        summary: &'a MergeSummary,
        /// Bytes of the synthetic full.
        stored: u64,
    },
    /// `path` stays although the plan deletes it: its store refuses to
    /// delete it (an Object Lock retention), which is never tried.
    Kept {
        /// The archive kept.
        path: &'a Path,
        /// Why, in words.
        why: &'a str,
    },
    /// `path` was deleted.
    Deleted {
        /// The archive deleted.
        path: &'a Path,
    },
}

/// Who hears what [`execute_prune`] does.
pub trait PruneObserver {
    /// A step done.
    fn event(&mut self, event: PruneEvent<'_>);
    /// Progress for the synthetic full about to be written over `path`
    /// (`total` logical bytes), if wanted.
    fn progress(&mut self, path: &Path, total: u64) -> Option<ProgressFn> {
        let _ = (path, total);
        None
    }
    /// A temporary file a process which is gone left beside an output was
    /// removed.
    fn stale(&mut self, stale: &StaleTemporary) {
        let _ = stale;
    }
}

/// How [`execute_prune`] writes and checks the synthetic fulls.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    /// The writer's options (compression, threads).
    pub writer: WriterOptions,
    /// Threads of the merge and of the check of each synthetic full
    /// (0: one per core).
    pub threads: usize,
}

/// Carry out `plan` (from [`plan_prune`] over `archives`, whose
/// directories or prefixes are `dirs`), in an order that never leaves a
/// point in time it keeps unrestorable:
///
/// 1. each fold is replaced by a synthetic full of its point in time,
///    written beside it, verified from its first byte ([`verify_written`])
///    and only then renamed over it (a failed fold changes nothing);
/// 2. every chain that stays must still resolve among the archives that
///    remain, and every kept point in time keep its configs
///    ([`check_configs_kept`]): otherwise nothing is deleted;
/// 3. only then are the archives deleted, newest first per chain; an
///    object its store keeps (Object Lock) stays and is said to stay.
///
/// Directories are synced at the end. `observer` hears each step.
pub fn execute_prune(
    plan: &PrunePlan,
    archives: &[PathBuf],
    dirs: &[PathBuf],
    options: &PruneOptions,
    observer: &mut dyn PruneObserver,
) -> Result<()> {
    // The configs of every kept point in time, to check that none is lost.
    let configs_before = kept_point_configs(plan, archives)?;
    let merge_options = MergeOptions {
        threads: options.threads,
    };
    for c in &plan.chains {
        let Some(k) = &c.fold else { continue };
        let chain = Arc::new(
            Chain::open(k, archives).map_err(|e| e.in_step(format!("opening {}", k.display())))?,
        );
        let dest = k
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{} is not valid UTF-8", k.display())))?;
        let total: u64 = chain.header().drives.iter().map(|d| d.size).sum();
        let progress = observer.progress(k, total);
        let what = format!("the synthetic full for {dest}");
        let (summary, stored) = write_synthetic_full(
            &chain,
            ArchiveOutput::new(dest, true),
            &options.writer,
            &merge_options,
            progress,
            &mut |s| observer.stale(s),
            |file| verify_written(file, options.threads, &what),
        )?;
        observer.event(PruneEvent::Folded {
            path: k,
            summary: &summary,
            stored,
        });
    }
    // Every archive that stays must still restore before anything goes.
    let deleted: Vec<&PathBuf> = plan.chains.iter().flat_map(|c| &c.delete).collect();
    let remaining: Vec<PathBuf> = archives
        .iter()
        .filter(|a| !deleted.contains(a))
        .cloned()
        .collect();
    for c in &plan.chains {
        if let Some(tip) = c.keep.last().or(c.fold.as_ref()) {
            Chain::open(tip, &remaining).map_err(|e| {
                e.in_step(format!(
                    "{} no longer resolves; nothing was deleted",
                    tip.display()
                ))
            })?;
        }
    }
    check_configs_kept(plan, &configs_before, &remaining)?;
    for c in &plan.chains {
        for d in &c.delete {
            if let Some(why) = storage::delete_blocked(d)? {
                observer.event(PruneEvent::Kept { path: d, why: &why });
                continue;
            }
            storage::delete(d)?;
            observer.event(PruneEvent::Deleted { path: d });
        }
    }
    for d in dirs {
        if let Ok(f) = std::fs::File::open(d) {
            let _ = f.sync_all();
        }
    }
    Ok(())
}

//! Incremental chains: an archive and the ancestors its "unchanged"
//! clusters come from, read as one point in time.
//!
//! A 3.0 archive names its parent by uuid, archive digest and state digest
//! (see [`ParentRef`]). Ancestors are found among the paths given, else
//! among the files in the archive's directory, and every link is proven by
//! content, never by what a file states about itself:
//!
//! - the parent itself: its archive digest, recomputed from its header and
//!   index when it is opened, equals the one the child names (and every
//!   extent it serves is checked against its extent table); or
//! - a stand-in (a synthetic full holding that point in time): its header
//!   lists the child's (uuid, archive digest, state digest), its own state
//!   digest (from its drive records) equals that state digest, and its
//!   leaves prove its drive digests (recomputed from its leaf pages when
//!   opened; every cluster it serves is checked against its leaf).
//!
//! 2.0 archives keep their rules: a link is accepted on its uuid and the
//! digest its footer states (2.0 cannot prove more). Drives are matched by
//! name from link to link (ids may differ when drives were added), and
//! must keep their size.

pub mod configs;
mod seek;

pub use seek::{Seek, ZeroFilled};

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{DriveInfo, Header, ParentRef, RunKind, CLUSTER_SIZE};
use crate::image::source::{DiskImage, Stretch};
use crate::index::{LeafItem, LeafSource};
use crate::read::reader::Reader;
use crate::read::stream::ArchiveFormat;
use crate::types::{uuid_text, ClusterNo, DriveId};

/// Links of a chain deeper than this are refused (a loop, or a chain that
/// should be merged).
pub const MAX_CHAIN: usize = 1000;

/// An archive and its ancestors, newest first.
pub struct Chain {
    links: Vec<Reader>,
}

impl Chain {
    /// Open `path` and, if it is incremental, its ancestors: each is looked
    /// for among `parents` first, then among the files beside `path`.
    pub fn open(path: &Path, parents: &[PathBuf]) -> Result<Chain> {
        Chain::with_newest(Reader::open(path)?, parents)
    }

    /// The chain of an archive already open (for example through
    /// [`Reader::open_salvage`]): its ancestors are found as for [`Chain::open`].
    pub fn with_newest(newest: Reader, parents: &[PathBuf]) -> Result<Chain> {
        let path = &newest.path().to_path_buf();
        let mut links = vec![newest];
        // Uuids every file looked at answers to (None: not an archive).
        let mut known: HashMap<PathBuf, Option<Vec<[u8; 16]>>> = HashMap::new();
        let mut beside: Option<Vec<PathBuf>> = None;
        while let Some(want) = links.last().expect("non-empty").header().parent {
            if links.len() > MAX_CHAIN {
                return Err(Error::Invalid(format!(
                    "{}: the chain of parents is longer than {MAX_CHAIN} archives",
                    path.display()
                )));
            }
            if links.iter().any(|l| {
                l.header().uuid == want.uuid
                    || l.header().stands_for.iter().any(|s| s.same_archive(&want))
            }) {
                return Err(Error::Invalid(format!(
                    "{}: the chain of parents loops back to uuid {}",
                    path.display(),
                    uuid_text(&want.uuid)
                )));
            }
            let found = match find_parent(&want, parents, &mut known)? {
                Some(r) => Some(r),
                None => {
                    let files = beside.get_or_insert_with(|| {
                        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                        list_dir(dir.unwrap_or(Path::new(".")))
                    });
                    find_parent(&want, files, &mut known)?
                }
            };
            let Some(parent) = found else {
                return Err(Error::Invalid(format!(
                    "{} needs its parent archive (uuid {}), which is neither beside it nor given with --parent",
                    links.last().expect("non-empty").path().display(),
                    uuid_text(&want.uuid)
                )));
            };
            links.push(parent);
        }
        // Memory stays bounded however long the chain: the ancestors share
        // one default-sized cache budget.
        if links.len() > 1 {
            let share = (crate::read::reader::DEFAULT_CACHE_BYTES / (links.len() - 1)).max(4 << 20);
            for link in &links[1..] {
                link.set_cache_bytes(share);
            }
        }
        let chain = Chain { links };
        chain.check_drives()?;
        Ok(chain)
    }

    /// The chain a child archive (header `child`, read from `beside` when it
    /// is a file) stands on, from its parent back; None for a full archive.
    pub fn open_parent(
        child: &Header,
        beside: Option<&Path>,
        parents: &[PathBuf],
    ) -> Result<Option<Chain>> {
        let Some(want) = child.parent else {
            return Ok(None);
        };
        let mut known = HashMap::new();
        let mut found = find_parent(&want, parents, &mut known)?;
        if found.is_none() {
            if let Some(path) = beside {
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                found = find_parent(&want, &list_dir(dir.unwrap_or(Path::new("."))), &mut known)?;
            }
        }
        let Some(parent) = found else {
            return Err(Error::Invalid(format!(
                "the archive needs its parent (uuid {}), which is neither beside it nor given with --parent",
                uuid_text(&want.uuid)
            )));
        };
        Chain::with_newest(parent, parents).map(Some)
    }

    /// Read bytes of the drive named `name` as of the newest point in time.
    pub fn read_named(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_link(0, name, offset, buf)
    }

    /// The newest archive (whose point in time the chain presents).
    pub fn newest(&self) -> &Reader {
        &self.links[0]
    }

    /// The newest archive's header.
    pub fn header(&self) -> &Header {
        self.links[0].header()
    }

    /// Every link, newest first.
    pub fn links(&self) -> &[Reader] {
        &self.links
    }

    /// Refuse a chain that is no point in time: its newest archive holds
    /// drives of an interrupted capture (only a retry completes them).
    pub fn refuse_interrupted(&self, selected: impl Fn(DriveId) -> bool) -> Result<()> {
        self.links[0].refuse_interrupted(selected)
    }

    /// Where the leaves of the newest point in time come from, for an
    /// archive written on top of it (its unchanged clusters): the links'
    /// leaf pages, proven as the links are.
    pub fn leaf_source(self: &Arc<Self>) -> Box<dyn LeafSource + Send + Sync> {
        Box::new(ChainLeaves {
            chain: self.clone(),
            link: 0,
        })
    }

    /// Read bytes `offset..offset + buf.len()` of drive `drive` (an id of
    /// the newest archive) as of the newest point in time.
    pub fn read_at(&self, drive: DriveId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let name = &self
            .header()
            .drive(drive)
            .ok_or_else(|| Error::Invalid(format!("no drive with id {drive}")))?
            .name;
        self.read_link(0, name, offset, buf)
    }

    /// What bytes from `offset` of drive `drive` (newest ids) hold at the
    /// newest point in time: data or zeros, and for how long (within one
    /// run), found from the indexes alone.
    pub fn status(&self, drive: DriveId, offset: u64) -> Result<Stretch> {
        let name = &self
            .header()
            .drive(drive)
            .ok_or_else(|| Error::Invalid(format!("no drive with id {drive}")))?
            .name;
        self.status_link(0, name, offset)
    }

    /// [`Chain::status`] of the drive named `name`.
    pub fn status_named(&self, name: &str, offset: u64) -> Result<Stretch> {
        self.status_link(0, name, offset)
    }

    /// The leaves of clusters `clusters` of drive `name` (of `size` bytes)
    /// at the newest point in time, in order.
    pub fn leaves_of_point(
        &self,
        name: &str,
        size: u64,
        clusters: Range<u64>,
        out: &mut dyn FnMut(LeafItem) -> Result<()>,
    ) -> Result<()> {
        self.leaves_at(0, name, size, clusters, out)
    }

    /// Drive `name` of link `link` (an error saying so if it lacks it).
    pub(crate) fn drive_named(&self, link: usize, name: &str) -> Result<&DriveInfo> {
        let reader = &self.links[link];
        reader
            .header()
            .drives
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{} has no drive {name} although a later archive marks it unchanged",
                    reader.path().display()
                ))
            })
    }

    /// What bytes from `offset` of drive `name` hold at link `link`:
    /// data or zeros, and for how long (within one run of that link).
    fn status_link(&self, link: usize, name: &str, offset: u64) -> Result<Stretch> {
        let reader = &self.links[link];
        let d = self.drive_named(link, name)?;
        let cs = CLUSTER_SIZE as u64;
        let run = reader
            .run_at(d.id, ClusterNo(offset / cs))?
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: the index has no run for drive {name} byte {offset}",
                    reader.path().display()
                ))
            })?;
        let len = (run.end() * cs).min(d.size) - offset;
        Ok(match run.kind {
            RunKind::Zero => Stretch::Zero(len),
            RunKind::Data => Stretch::Data(len),
            RunKind::Unchanged if link + 1 < self.links.len() => {
                match self.status_link(link + 1, name, offset)? {
                    Stretch::Zero(n) => Stretch::Zero(n.min(len)),
                    Stretch::Data(n) => Stretch::Data(n.min(len)),
                }
            }
            RunKind::Unchanged => Stretch::Data(len),
        })
    }

    fn read_link(&self, link: usize, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let reader = &self.links[link];
        let d = self.drive_named(link, name)?;
        let end = offset + buf.len() as u64;
        let cs = CLUSTER_SIZE as u64;
        let mut pos = offset;
        while pos < end {
            let Some(run) = reader.run_at(d.id, ClusterNo(pos / cs))? else {
                // Let the reader produce its own error for a hole in the index.
                return reader.read_at(d.id, pos, &mut buf[(pos - offset) as usize..]);
            };
            let run_end = (run.end() * cs).min(end);
            let piece = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if run.kind == RunKind::Unchanged {
                if link + 1 >= self.links.len() {
                    return Err(Error::Invalid(format!(
                        "{}: drive {name} bytes {pos}..{run_end} are unchanged from a parent that is not open",
                        reader.path().display()
                    )));
                }
                self.read_link(link + 1, name, pos, piece)?;
            } else {
                reader.read_at(d.id, pos, piece)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Every drive a link marks unchanged exists in its parent with the
    /// same size (from the drive records: no run is read).
    fn check_drives(&self) -> Result<()> {
        for pair in self.links.windows(2) {
            let (child, parent) = (&pair[0], &pair[1]);
            for (d, r) in child.header().drives.iter().zip(child.drive_records()) {
                if !r.unchanged {
                    continue;
                }
                match parent.header().drives.iter().find(|p| p.name == d.name) {
                    Some(p) if p.size == d.size => {}
                    Some(p) => {
                        return Err(Error::Invalid(format!(
                            "drive {} is {} bytes in {} but {} bytes in its parent {}",
                            d.name,
                            d.size,
                            child.path().display(),
                            p.size,
                            parent.path().display()
                        )))
                    }
                    None => {
                        return Err(Error::Invalid(format!(
                            "{} marks drive {} unchanged, but its parent {} has no such drive",
                            child.path().display(),
                            d.name,
                            parent.path().display()
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// The leaves of clusters `clusters` of drive `name` at link `link`'s
    /// point in time, in order.
    fn leaves_at(
        &self,
        link: usize,
        name: &str,
        size: u64,
        clusters: Range<u64>,
        out: &mut dyn FnMut(LeafItem) -> Result<()>,
    ) -> Result<()> {
        let reader = &self.links[link];
        let d = self.drive_named(link, name)?;
        if d.size != size {
            return Err(Error::Invalid(format!(
                "drive {name} is {size} bytes but {} bytes in {}",
                d.size,
                reader.path().display()
            )));
        }
        let id = d.id;
        reader.leaves_of(id, clusters, out, &mut |range, out| {
            if link + 1 >= self.links.len() {
                return Err(Error::Invalid(format!(
                    "{}: drive {name} clusters {}..{} are unchanged from a parent that is not open",
                    reader.path().display(),
                    range.start,
                    range.end
                )));
            }
            self.leaves_at(link + 1, name, size, range, out)
        })
    }
}

/// The leaves of a chain's newest point in time, as a [`LeafSource`] for an
/// archive written on top of it.
struct ChainLeaves {
    chain: Arc<Chain>,
    link: usize,
}

impl LeafSource for ChainLeaves {
    fn leaves(
        &mut self,
        drive: &DriveInfo,
        clusters: Range<u64>,
        out: &mut dyn FnMut(LeafItem) -> Result<()>,
    ) -> Result<bool> {
        // Only 3.0 links have leaves (a 2.0 chain has no tree digest).
        if self.chain.links[self.link..]
            .iter()
            .any(|l| l.format() != ArchiveFormat::V3)
        {
            return Ok(false);
        }
        self.chain
            .leaves_at(self.link, &drive.name, drive.size, clusters, out)?;
        Ok(true)
    }
}

/// One drive of a chain at its newest point in time, as a source image
/// (so `diff` compares against it the way it reads an image).
pub struct ChainDrive {
    chain: Arc<Chain>,
    id: DriveId,
    name: String,
    size: u64,
}

impl ChainDrive {
    /// Drive `id` (of the newest archive) of `chain`.
    pub fn new(chain: Arc<Chain>, id: DriveId) -> Result<ChainDrive> {
        let d = chain
            .header()
            .drive(id)
            .ok_or_else(|| Error::Invalid(format!("no drive with id {id}")))?
            .clone();
        Ok(ChainDrive {
            chain,
            id,
            name: d.name,
            size: d.size,
        })
    }
}

impl DiskImage for ChainDrive {
    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        self.chain.newest().path()
    }

    fn status(&self, offset: u64) -> Result<Stretch> {
        self.chain.status_link(0, &self.name, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.chain.read_at(self.id, offset, buf)
    }
}

/// Whether `reader` is exactly the archive `want` names: same uuid and
/// archive digest (recomputed, for 3.0), and for a 3.0 reference the same
/// state digest.
pub fn is_exactly(reader: &Reader, want: &ParentRef) -> bool {
    if reader.header().uuid != want.uuid || reader.archive_digest() != Some(want.digest) {
        return false;
    }
    match want.state {
        None => reader.format() == ArchiveFormat::V2,
        Some(s) => {
            reader.format() == ArchiveFormat::V3
                && reader.identity().ok().and_then(|i| i.state) == Some(s)
        }
    }
}

/// Whether `reader` claims to stand in for `want` (its header lists it).
/// The claim alone proves nothing: see [`accept_stand_in`].
pub fn claims_to_stand_in(reader: &Reader, want: &ParentRef) -> bool {
    reader
        .header()
        .stands_for
        .iter()
        .any(|s| s.same_archive(want))
}

/// Accept `reader` as a stand-in for `want`, proving it: it lists `want`,
/// it is a full 3.0 archive, its state digest is the one listed (and the
/// one `want` names), and its leaf pages prove its drive digests (from
/// then on every cluster it serves is checked against its leaf). A 2.0
/// stand-in is accepted for a 2.0 reference on its list alone.
pub fn accept_stand_in(reader: &Reader, want: &ParentRef) -> Result<()> {
    let Some(listed) = reader
        .header()
        .stands_for
        .iter()
        .find(|s| s.same_archive(want))
        .copied()
    else {
        return Err(Error::Invalid(format!(
            "{} does not stand in for uuid {}",
            reader.path().display(),
            uuid_text(&want.uuid)
        )));
    };
    match reader.format() {
        ArchiveFormat::V2 if want.state.is_none() => Ok(()),
        ArchiveFormat::V3 => {
            if reader.header().parent.is_some() {
                return Err(Error::Invalid(format!(
                    "{} claims to stand in for uuid {} but is incremental: a stand-in is a full archive",
                    reader.path().display(),
                    uuid_text(&want.uuid)
                )));
            }
            let state = reader.state_digest();
            // A 2.0 child names no state digest (and a list entry for a 2.0
            // archive holds zeros): the stand-in's own leaves must still
            // prove its drive digests.
            if state.is_none() || (want.state.is_some() && state != listed.state) {
                return Err(Error::Invalid(format!(
                    "{} claims to stand in for uuid {} but its drives' digests give another state digest: it does not hold that point in time",
                    reader.path().display(),
                    uuid_text(&want.uuid)
                )));
            }
            reader.prove_leaves().map_err(|e| {
                Error::Invalid(format!(
                    "{} claims to stand in for uuid {} but its leaves do not prove its drive digests: {e}",
                    reader.path().display(),
                    uuid_text(&want.uuid)
                ))
            })
        }
        _ => Err(Error::Invalid(format!(
            "{}: a version 2.0 archive cannot stand in for the 3.0 archive uuid {}",
            reader.path().display(),
            uuid_text(&want.uuid)
        ))),
    }
}

/// Open the archive `want` names among `candidates`: the archive itself if
/// it is there, else a proven stand-in for it. A file with `want`'s uuid
/// but other content is an error unless a stand-in is found. Files that
/// are not archives are skipped.
fn find_parent(
    want: &ParentRef,
    candidates: &[PathBuf],
    known: &mut HashMap<PathBuf, Option<Vec<[u8; 16]>>>,
) -> Result<Option<Reader>> {
    let mut mismatch = None;
    let mut stand_in_failed = None;
    let mut stand_ins = Vec::new();
    for path in candidates {
        if known
            .get(path)
            .is_some_and(|u| !u.as_ref().is_some_and(|u| u.contains(&want.uuid)))
        {
            continue;
        }
        let Ok(reader) = Reader::open(path) else {
            known.insert(path.clone(), None);
            continue;
        };
        let h = reader.header();
        let uuids = std::iter::once(h.uuid)
            .chain(h.stands_for.iter().map(|r| r.uuid))
            .collect::<Vec<_>>();
        known.insert(path.clone(), Some(uuids));
        if is_exactly(&reader, want) {
            return Ok(Some(reader));
        }
        if reader.header().uuid == want.uuid {
            mismatch = Some(path.clone());
        } else if claims_to_stand_in(&reader, want) {
            stand_ins.push(reader);
        }
    }
    for reader in stand_ins {
        match accept_stand_in(&reader, want) {
            Ok(()) => return Ok(Some(reader)),
            Err(e) => stand_in_failed = Some(e),
        }
    }
    match (stand_in_failed, mismatch) {
        (Some(e), _) => Err(e),
        (None, Some(p)) => Err(Error::Invalid(format!(
            "{} has the parent's uuid {} but not its content (its archive digest, recomputed, is not the one the child names): it is not the archive the child was made from",
            p.display(),
            uuid_text(&want.uuid)
        ))),
        (None, None) => Ok(None),
    }
}

/// Regular files in `dir`, sorted (best effort: an unreadable directory
/// lists nothing).
fn list_dir(dir: &Path) -> Vec<PathBuf> {
    if crate::storage::remote_for(dir).is_some() {
        return crate::storage::list(dir);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

//! Synthetic fulls: the newest point in time of a chain written as one
//! self-contained archive, streaming from the chain's extents with bounded
//! memory.
//!
//! Each drive of the newest archive is walked in cluster order, resolving
//! unchanged runs through the older links (run pages are read as they are
//! needed). A first walk counts, per extent, how many of its data clusters
//! are current at the newest point; a second writes: an extent all of
//! whose data clusters are current is appended as it is stored
//! ([`Writer::append_stored`]: not compressed again, framed again with the
//! new archive's uuid and sequence number), only the current clusters of
//! extents that later links partly superseded are decoded and encoded
//! again, zero clusters become zero runs.
//!
//! Everything folded is checked: every link is proven by content when the
//! chain is opened, every extent against its archive's extent table, and
//! the drive digest of every drive written (computed by the writer from the
//! bytes it stores) must equal the one the newest archive records, or
//! nothing is finished: a damaged or forged link is refused, never laundered.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use crate::atomic::StaleTemporary;
use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::extent::ClusterData;
use crate::format::{limits, ParentRef, RunKind, CLUSTER_SIZE};
use crate::ops::output::{write_archive, ArchiveOutput};
use crate::read::reader::Reader;
use crate::read::stream::ArchiveFormat;
use crate::types::{cluster_len, uuid_text, ClusterNo, DriveId, ExtentRef};
use crate::util::ProgressFn;
use crate::write::writer::{ArchiveMeta, Writer, WriterOptions};

/// Tuning of [`merge_chain`].
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Worker threads (0: one per core); the writer's options decide them.
    pub threads: usize,
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
    /// Extents decoded once more because they had left the bounded cache.
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
    if let Some(digest) = newest.archive_digest() {
        meta.stands_for.push(ParentRef {
            uuid: h.uuid,
            digest,
            // A 2.0 archive records no state digest: the stand-in proves
            // its own leaves instead (see `chain::accept_stand_in`).
            state: Some(
                newest
                    .identity()
                    .ok()
                    .and_then(|i| i.state)
                    .unwrap_or([0; 32]),
            ),
        });
    }
    for s in &h.stands_for {
        meta.stands_for.push(ParentRef {
            state: Some(s.state.unwrap_or([0; 32])),
            ..*s
        });
    }
    meta.stands_for.truncate(limits::MAX_STANDS_FOR);
    meta
}

/// Clusters of a drive at the newest point, and where they come from.
#[derive(Clone, Copy, Debug)]
enum Piece {
    /// Zero clusters.
    Zero(u64, u64),
    /// Data of extent `key` of link `link`.
    Data {
        start: u64,
        end: u64,
        link: usize,
        key: ExtentRef,
    },
}

/// Walk clusters `range` of drive `name` as of link `link`'s point in
/// time, in order, resolving unchanged runs through the older links.
fn resolve(
    chain: &Chain,
    link: usize,
    name: &str,
    range: Range<u64>,
    f: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let reader = &chain.links()[link];
    let d = chain.drive_named(link, name)?;
    let in_archive = |e: Error| e.in_archive(reader.path());
    let mut pos = range.start;
    let mut runs = reader.runs_from(d.id, pos).map_err(in_archive)?;
    while pos < range.end {
        let r = runs
            .next()
            .transpose()
            .map_err(in_archive)?
            .filter(|r| r.start <= pos)
            .ok_or_else(|| {
                Error::corrupt(
                    0,
                    format!("the index has no run for drive {name} cluster {pos}"),
                )
                .in_archive(reader.path())
            })?;
        let end = r.end().min(range.end);
        match r.kind {
            RunKind::Zero => f(Piece::Zero(pos, end))?,
            RunKind::Data => f(Piece::Data {
                start: pos,
                end,
                link,
                key: r.extent,
            })?,
            RunKind::Unchanged if link + 1 < chain.links().len() => {
                resolve(chain, link + 1, name, pos..end, f)?
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
    }
    Ok(())
}

/// Current data clusters per extent, per link: dense by sequence number for
/// 3.0 links (4 bytes per extent), a map for 2.0 and VMA v1 links.
enum Counts {
    Dense(Vec<u32>),
    Map(HashMap<ExtentRef, u64>),
}

/// The slot of extent `key` of `reader` in a dense per-extent table.
fn dense_slot(reader: &Reader, key: ExtentRef) -> Option<usize> {
    reader
        .extent_number(key)
        .and_then(|n| usize::try_from(n).ok())
}

impl Counts {
    fn add(&mut self, reader: &Reader, key: ExtentRef, n: u64) -> Result<()> {
        match self {
            Counts::Dense(v) => {
                let slot = dense_slot(reader, key)
                    .and_then(|i| v.get_mut(i))
                    .ok_or_else(|| {
                        Error::corrupt(
                            0,
                            format!(
                                "a run names {}, which does not exist",
                                reader.extent_label(key)
                            ),
                        )
                    })?;
                *slot = slot.saturating_add(n.min(u32::MAX as u64) as u32);
            }
            Counts::Map(m) => *m.entry(key).or_default() += n,
        }
        Ok(())
    }

    fn get(&self, reader: &Reader, key: ExtentRef) -> u64 {
        match self {
            Counts::Dense(v) => dense_slot(reader, key)
                .and_then(|i| v.get(i))
                .copied()
                .unwrap_or(0) as u64,
            Counts::Map(m) => m.get(&key).copied().unwrap_or(0),
        }
    }
}

/// Write every cluster of `chain`'s newest point into `writer`, whose
/// drives must be the newest archive's (as [`synthetic_meta`] gives them),
/// and make the writer check each drive's digest against the newest
/// archive's record. The caller finishes the writer (which fails if a
/// digest differs). `progress` gets each step's name, bytes done and total
/// bytes: logical bytes of all drives together while the index is walked
/// (counting claims, then merging), the archive's bytes while the extents
/// no run names any more are checked.
pub fn merge_chain<W: Write>(
    chain: &Arc<Chain>,
    writer: &mut Writer<W>,
    _options: &MergeOptions,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<MergeSummary> {
    chain.refuse_interrupted(|_| true)?;
    let newest = chain.newest();
    if writer.header().drives != chain.header().drives {
        return Err(Error::Invalid(
            "the merged archive must have the newest archive's drives".into(),
        ));
    }
    // End to end: the synthetic full must hold exactly the point in time
    // the newest archive records.
    if newest.format() == ArchiveFormat::V3 {
        for (d, r) in chain.header().drives.iter().zip(newest.drive_records()) {
            let digest = r.digest.ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: drive {} records no drive digest",
                    newest.path().display(),
                    d.name
                ))
            })?;
            writer.expect_drive_digest(d.id, digest)?;
        }
    }
    let links = chain.links();
    let mut counts: Vec<Counts> = links
        .iter()
        .map(|l| match l.format() {
            ArchiveFormat::V3 if l.extent_count() <= DENSE_EXTENTS => {
                Counts::Dense(vec![0; l.extent_count() as usize])
            }
            _ => Counts::Map(HashMap::new()),
        })
        .collect();
    let drives = chain.header().drives.clone();
    let total: u64 = drives.iter().map(|d| d.size).sum();
    let cs = CLUSTER_SIZE as u64;
    let mut done_before = 0u64;
    for d in &drives {
        resolve(chain, 0, &d.name, 0..d.clusters(), &mut |p| {
            if let Piece::Data {
                start,
                end,
                link,
                key,
            } = p
            {
                counts[link].add(&links[link], key, end - start)?;
                progress(
                    "counting claims",
                    done_before + (end * cs).min(d.size),
                    total,
                );
            }
            Ok(())
        })?;
        done_before += d.size;
    }
    let same_encoding: Vec<bool> = links
        .iter()
        .map(|l| {
            l.format().is_native()
                && l.header().compression == writer.header().compression
                && writer.accepts_codec(l.header().compression.codec)
        })
        .collect();
    // Per link: a drive id of that link as the newest archive's.
    let id_map: Vec<[Option<DriveId>; 256]> = links
        .iter()
        .map(|l| {
            let mut map = [None; 256];
            for d in &l.header().drives {
                map[d.id.0 as usize] = drives.iter().find(|n| n.name == d.name).map(|n| n.id);
            }
            map
        })
        .collect();
    let mut summary = MergeSummary {
        links: links.len(),
        ..Default::default()
    };
    let new_set = |l: &Reader| match l.format() {
        ArchiveFormat::V3 if l.extent_count() <= DENSE_EXTENTS => {
            KeySet::Bits(vec![0; (l.extent_count() as usize).div_ceil(64)])
        }
        _ => KeySet::Set(HashSet::new()),
    };
    let mut copied: Vec<KeySet> = links.iter().map(new_set).collect();
    let mut decoded: Vec<KeySet> = links.iter().map(new_set).collect();
    let mut done_before = 0u64;
    let mut buf = vec![0u8; CLUSTER_SIZE];
    for d in &drives {
        resolve(chain, 0, &d.name, 0..d.clusters(), &mut |p| {
            let end_cluster = match p {
                Piece::Zero(start, end) => {
                    writer.write_zeros(d.id, start..end)?;
                    end
                }
                Piece::Data {
                    start,
                    end,
                    link,
                    key,
                } => {
                    let reader = &links[link];
                    if copied[link].contains(reader, key) {
                        return Ok(());
                    }
                    let in_archive = |e: Error| e.in_archive(reader.path());
                    let current = counts[link].get(reader, key);
                    if !decoded[link].contains(reader, key) && same_encoding[link] {
                        let mut stored = reader.stored_extent(key).map_err(in_archive)?;
                        claims_agree(reader, key, stored.entries()).map_err(in_archive)?;
                        let held: u64 = stored
                            .entries()
                            .iter()
                            .filter(|e| e.kind == RunKind::Data)
                            .map(|e| e.count as u64)
                            .sum();
                        if held == current {
                            let map = &id_map[link];
                            if stored.entries().iter().any(|e| {
                                e.kind == RunKind::Data && map[e.drive.0 as usize].is_none()
                            }) {
                                return Err(in_archive(Error::corrupt(
                                    stored.offset(),
                                    "the extent holds data of a drive the newest archive lacks",
                                )));
                            }
                            stored.keep_data_entries(|id| map[id.0 as usize].expect("checked"));
                            summary.copied_extents += 1;
                            summary.copied_clusters += held;
                            copied[link].insert(reader, key);
                            writer.append_stored(stored)?;
                            progress("merging", done_before + (end * cs).min(d.size), total);
                            return Ok(());
                        }
                    }
                    let first = decoded[link].insert(reader, key);
                    let ext = reader.extent(key).map_err(in_archive)?;
                    if first {
                        summary.reencoded_extents += 1;
                        claims_agree(reader, key, &ext.entries).map_err(in_archive)?;
                    }
                    // The extent names the drive by its link's id.
                    let link_id = id_map[link]
                        .iter()
                        .position(|m| *m == Some(d.id))
                        .map(|i| DriveId(i as u8))
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "drive {} is not in {}",
                                d.name,
                                reader.path().display()
                            ))
                        })?;
                    for c in start..end {
                        let cluster = ClusterNo(c);
                        let len = cluster_len(d.size, cluster);
                        match ext.cluster(link_id, cluster) {
                            Some(data @ ClusterData::Data { .. }) => {
                                data.expand_into(&mut buf[..len]);
                                writer.write_cluster(d.id, cluster, &buf[..len])?;
                                summary.reencoded_clusters += 1;
                            }
                            _ => {
                                return Err(in_archive(Error::corrupt(
                                    ext.offset,
                                    format!(
                                        "the extent holds no data for cluster {c} of drive {} where the index places it",
                                        d.name
                                    ),
                                )))
                            }
                        }
                    }
                    end
                }
            };
            progress(
                "merging",
                done_before + (end_cluster * cs).min(d.size),
                total,
            );
            Ok(())
        })?;
        done_before += d.size;
    }
    // Every other extent of every 3.0 link is read too: intact, bound to
    // its place, and claiming nothing its index gives to another (a second
    // copy of a cluster, conflicting or not, is refused, not dropped).
    for (link, reader) in links.iter().enumerate() {
        if reader.format() != ArchiveFormat::V3 {
            continue;
        }
        let in_archive = |e: Error| e.in_archive(reader.path());
        let size = std::fs::metadata(reader.path()).map_or(0, |m| m.len());
        for key in reader.extent_refs() {
            if copied[link].contains(reader, key) || decoded[link].contains(reader, key) {
                continue;
            }
            let stored = reader.stored_extent(key).map_err(in_archive)?;
            claims_agree(reader, key, stored.entries()).map_err(in_archive)?;
            progress(
                "checking superseded extents",
                stored.offset() + stored.stored_len(),
                size,
            );
        }
    }
    progress("merging", total, total);
    Ok(summary)
}

/// Whether what extent `key` of `reader` claims is what the index says:
/// every run it holds lies in runs of the same kind (data runs naming this
/// extent). A claim the index gives to another extent is a second copy of
/// those clusters, which a merge refuses to fold rather than drop.
fn claims_agree(reader: &Reader, key: ExtentRef, entries: &[crate::format::Entry]) -> Result<()> {
    for e in entries {
        let Some(d) = reader.header().drive(e.drive) else {
            return Err(Error::corrupt(
                0,
                format!(
                    "{} names drive id {} which the header does not list",
                    reader.extent_label(key),
                    e.drive
                ),
            ));
        };
        let end = e.start + e.count as u64;
        let mut pos = e.start;
        let mut runs = reader.runs_from(e.drive, pos)?;
        while pos < end {
            let r = runs.next().transpose()?.filter(|r| r.start <= pos);
            let ok =
                r.is_some_and(|r| r.kind == e.kind && (e.kind != RunKind::Data || r.extent == key));
            if !ok {
                let range = d.range(pos..end);
                return Err(Error::Conflicting {
                    what: format!(
                        "{} holds drive {} bytes {}..{} but the index gives them to another extent or kind: two copies of the same clusters; verify the archive (a merge does not fold it)",
                        reader.extent_label(key), d.name, range.bytes.start, range.bytes.end
                    ),
                    ranges: vec![range],
                });
            }
            pos = r.map_or(end, |r| r.end()).min(end);
        }
    }
    Ok(())
}

/// Links with at most this many extents keep their per-extent counts and
/// flags in dense arrays (6 bytes per extent).
const DENSE_EXTENTS: u64 = 1 << 26;

/// A set of extent keys: a bit per extent for 3.0 links, a hash set for others.
enum KeySet {
    Bits(Vec<u64>),
    Set(HashSet<ExtentRef>),
}

impl KeySet {
    fn contains(&self, reader: &Reader, key: ExtentRef) -> bool {
        match self {
            KeySet::Bits(b) => dense_slot(reader, key)
                .is_some_and(|i| b.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)),
            KeySet::Set(s) => s.contains(&key),
        }
    }

    /// Add `key`; false when it was there already.
    fn insert(&mut self, reader: &Reader, key: ExtentRef) -> bool {
        match self {
            KeySet::Bits(b) => {
                match dense_slot(reader, key).and_then(|i| Some((b.get_mut(i / 64)?, i))) {
                    Some((w, i)) => {
                        let had = *w & (1 << (i % 64)) != 0;
                        *w |= 1 << (i % 64);
                        !had
                    }
                    None => false,
                }
            }
            KeySet::Set(s) => s.insert(key),
        }
    }
}

/// Write the synthetic full of `chain`'s newest point to `output` (see
/// [`crate::ops::output::write_archive`]); `check` sees the finished
/// archive file before it is renamed into place. `progress` follows the
/// writer and the merge's steps. Returns what the merge did and the bytes
/// written.
pub fn write_synthetic_full(
    chain: &Arc<Chain>,
    output: ArchiveOutput<'_>,
    writer_options: &WriterOptions,
    options: &MergeOptions,
    progress: Option<ProgressFn>,
    on_stale: &mut dyn FnMut(&StaleTemporary),
    check: impl FnOnce(&File) -> Result<()>,
) -> Result<(MergeSummary, u64)> {
    chain.refuse_interrupted(|_| true)?;
    let meta = synthetic_meta(chain);
    let total: u64 = meta.drives.iter().map(|d| d.size).sum();
    let output = output.expecting(total + (64 << 20));
    write_archive(
        &output,
        on_stale,
        |out| {
            let mut writer = Writer::new(out, meta, writer_options)?;
            writer.set_progress(progress.clone());
            let summary = merge_chain(chain, &mut writer, options, &mut |what, n, t| {
                if let Some(p) = &progress {
                    p(what, n, t)
                }
            })?;
            writer.finish()?;
            Ok(summary)
        },
        check,
    )
}

//! Extraction sinks: sparse raw drive files and config blobs, written under
//! temporary names and renamed into place only when everything succeeded.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::atomic::AtomicFile;
use crate::chain::configs::point_configs_over;
use crate::chain::Chain;
use crate::error::{Error, IoContext, Result};
use crate::extent::{ClusterData, DecodedExtent};
use crate::format::{check_name, ConfigBlob, Header, BLOCK_SIZE};
use crate::image::qcow2::{compress_cluster, Qcow2Writer};
use crate::index::{LeafItem, LeafSource};
use crate::read::stream::{ArchiveStream, HashDrives, PassOptions, PassReport};
use crate::types::{cluster_len, ClusterNo, DriveId, DriveRange};

/// How extracted drives are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DriveFormat {
    /// `<drive>.raw`, sparse: zero regions stay holes.
    #[default]
    Raw,
    /// `<drive>.qcow2` (version 3); only non-zero clusters are allocated.
    Qcow2 {
        /// zstd-compress clusters (QEMU 5.1 and later read them).
        compress: bool,
    },
}

impl DriveFormat {
    /// File name extension of drive files in this format.
    pub fn extension(self) -> &'static str {
        match self {
            DriveFormat::Raw => "raw",
            DriveFormat::Qcow2 { .. } => "qcow2",
        }
    }
}

/// Check, before an archive is written, that its members can be extracted
/// and mounted side by side: every drive file name (`.raw`, `.qcow2`) is a
/// valid file name, and no two members (nor `archive.json`, which `mount`
/// adds) share a name.
pub fn check_member_names<'a>(
    drives: impl IntoIterator<Item = &'a str>,
    configs: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let mut seen: Vec<String> = vec!["archive.json".into()];
    let mut claim = |name: String, what: &str| -> Result<()> {
        check_name(&name)?;
        if seen.contains(&name) {
            return Err(Error::Invalid(format!(
                "{what} would be extracted as {name:?}, which another member (or the mount's archive.json) already uses"
            )));
        }
        seen.push(name);
        Ok(())
    };
    for d in drives {
        for format in [DriveFormat::Raw, DriveFormat::Qcow2 { compress: false }] {
            claim(
                format!("{d}.{}", format.extension()),
                &format!("drive {d:?}"),
            )?;
        }
    }
    for c in configs {
        claim(c.to_string(), &format!("config {c:?}"))?;
    }
    Ok(())
}

/// What to extract.
#[derive(Clone, Default)]
pub struct ExtractOptions {
    /// Format of the drive files.
    pub format: DriveFormat,
    /// Drive names to extract (empty: all).
    pub drives: Vec<String>,
    /// Overwrite existing files.
    pub force: bool,
    /// Decoder threads (0: one per core).
    pub threads: usize,
    /// Go on past damage and gaps: write everything intact, leave what is
    /// lost as zeros (holes), and report it in the summary.
    pub salvage: bool,
    /// 2.0 archives: also compute each extracted drive's plain SHA-256
    /// (the 2.0 drive digest) and fail on a mismatch with the recorded one.
    /// 3.0 drive digests are always checked, end to end: over every byte
    /// written, those read from ancestors included.
    pub check_drive_digests: bool,
    /// Progress of the steps after the extents (checking the index and
    /// the drive digests).
    pub progress: Option<crate::util::ProgressFn>,
}

/// The ancestors of an incremental archive, for [`extract`]: what its
/// "unchanged" clusters hold. See [`Chain::open_parent`].
pub type Ancestors<'a> = Option<&'a Chain>;

/// Result of an extraction.
#[derive(Debug)]
pub struct ExtractSummary {
    /// Files written (final paths).
    pub files: Vec<PathBuf>,
    /// The pass's report.
    pub report: PassReport,
}

/// Output file names for the drives selected and every config, checked
/// for safety, collisions and (without `force`) existing files.
/// Drive outputs (id, path) and config outputs (index, path).
type Plan = (Vec<(DriveId, PathBuf)>, Vec<(usize, PathBuf)>);

fn plan(
    header: &Header,
    blobs: &[ConfigBlob],
    dir: &Path,
    options: &ExtractOptions,
) -> Result<Plan> {
    for want in &options.drives {
        if !header.drives.iter().any(|d| &d.name == want) {
            let names: Vec<&str> = header.drives.iter().map(|d| d.name.as_str()).collect();
            return Err(Error::Invalid(format!(
                "the archive has no drive named {want:?} (it has: {})",
                names.join(", ")
            )));
        }
    }
    let mut drives = Vec::new();
    for d in &header.drives {
        if options.drives.is_empty() || options.drives.contains(&d.name) {
            let file = format!("{}.{}", d.name, options.format.extension());
            check_name(&file)?;
            drives.push((d.id, dir.join(file)));
        }
    }
    let mut configs = Vec::new();
    for (i, c) in blobs.iter().enumerate() {
        check_name(&c.name)?;
        configs.push((i, dir.join(&c.name)));
    }
    let mut all: Vec<&PathBuf> = drives
        .iter()
        .map(|(_, p)| p)
        .chain(configs.iter().map(|(_, p)| p))
        .collect();
    all.sort();
    if let Some(w) = all.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::Invalid(format!(
            "two archive members would both be written to {}",
            w[0].display()
        )));
    }
    if !options.force {
        // Checked again, atomically, when the files are renamed into place.
        if let Some(p) = all.iter().find(|p| p.symlink_metadata().is_ok()) {
            return Err(Error::Exists {
                path: p.display().to_string(),
            });
        }
    }
    Ok((drives, configs))
}

/// Extract from an archive stream (file or pipe, one pass) into `dir`:
/// `<drive>.raw` sparse files and one file per config blob of the point in
/// time (stored in the archive, or taken from the nearest ancestor that
/// stores them, see [`crate::chain::configs`]). Without
/// `salvage`, the first problem stops it and nothing appears under a final
/// name; with it, everything intact is written and the report lists what
/// was lost.
pub fn extract<R: Read>(
    stream: ArchiveStream<R>,
    dir: &Path,
    options: &ExtractOptions,
    ancestors: Ancestors,
    mut progress: impl FnMut(u64),
) -> Result<ExtractSummary> {
    let header = stream.header().clone();
    if ancestors.is_none() {
        refuse_incremental(&header)?;
    }
    let configs = point_configs_over(&header, ancestors).blobs();
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let (drive_plan, config_plan) = plan(&header, &configs, dir, options)?;
    let mut targets: Vec<Option<DriveTarget>> = (0..=255).map(|_| None).collect();
    for (id, path) in &drive_plan {
        let out = AtomicFile::create(path)?.replacing(options.force);
        let size = header.drive(*id).expect("planned drive").size;
        targets[id.0 as usize] = Some(match options.format {
            DriveFormat::Raw => {
                out.set_len(size)?;
                DriveTarget::Raw { out, size }
            }
            DriveFormat::Qcow2 { compress } => DriveTarget::Qcow2 {
                out: Qcow2Writer::new(out, size, compress)?,
                size,
                compress,
            },
        });
    }
    let threads = crate::write::writer::effective_threads(options.threads);
    let mut compressors = Vec::new();
    if matches!(options.format, DriveFormat::Qcow2 { compress: true }) {
        for _ in 0..threads {
            compressors.push(crate::image::qcow2::write::cluster_compressor()?);
        }
    }
    let pass_options = PassOptions {
        threads: options.threads,
        keep_going: options.salvage,
        // A drive whose SHA-256 differs is never committed (salvage writes
        // what it can and says what is lost, so it skips the whole-drive hash).
        hash_drives: if options.check_drive_digests && !options.salvage {
            HashDrives::Only(drive_plan.iter().map(|(id, _)| *id).collect())
        } else {
            HashDrives::None
        },
        progress: options.progress.clone(),
        ..Default::default()
    };
    let targets = RefCell::new(targets);
    let compressors = RefCell::new(compressors);
    let mut fill = ancestors.map(|chain| Fill {
        chain,
        header: &header,
        targets: &targets,
        compressors: &compressors,
        salvage: options.salvage,
        want_leaves: stream.format() == crate::read::stream::ArchiveFormat::V3,
        lost: Vec::new(),
    });
    let mut report = stream.pass_with(
        &pass_options,
        fill.as_mut().map(|f| f as &mut dyn LeafSource),
        |ext| {
            progress(ext.offset + ext.stored_len);
            write_extent(
                ext,
                &mut targets.borrow_mut(),
                &mut compressors.borrow_mut(),
            )
        },
    )?;
    let fill_lost = fill.map(|f| f.lost);
    let mut targets = targets.into_inner();
    if let Some(records) = &report.records {
        crate::read::reader::refuse_interrupted(&header, records, |id| {
            targets[id.0 as usize].is_some()
        })?;
    }
    if let Some(lost) = fill_lost {
        let lost_drives: Vec<DriveId> = lost.iter().map(|(r, _)| r.drive).collect();
        for (range, e) in lost {
            report.damaged.push(range);
            report.problems.push(e);
        }
        // Ancestors' losses leave the point in time unproven, not wrong.
        for (slot, d) in header.drives.iter().enumerate() {
            if lost_drives.contains(&d.id) {
                report.digests[slot] = crate::read::stream::DriveDigestCheck::NotChecked;
                report.problems.retain(
                    |p| !matches!(p, Error::DriveDigestMismatch { drive_name, .. } if *drive_name == d.name),
                );
            }
        }
    }
    // Clusters two intact extents hold differently: zeros, like mount --salvage.
    for r in &report.conflicting {
        if let Some(t) = targets[r.drive.0 as usize].as_mut() {
            zero_range(t, r.bytes.clone())?;
        }
    }
    // Everything is staged under temporary names, then committed as one:
    // all files or none (see `atomic::commit_all`).
    let mut staged = Vec::new();
    let mut files = Vec::new();
    for (i, path) in &config_plan {
        let mut out = AtomicFile::create(path)?.replacing(options.force);
        out.write_all(&configs[*i].data)
            .ctx(|| format!("writing {}", path.display()))?;
        staged.push(out);
        files.push(path.clone());
    }
    for (id, path) in &drive_plan {
        staged.push(match targets[id.0 as usize].take().expect("target") {
            DriveTarget::Raw { out, .. } => out,
            DriveTarget::Qcow2 { out, .. } => out.finish()?,
        });
        files.push(path.clone());
    }
    crate::atomic::commit_all(staged)?;
    Ok(ExtractSummary { files, report })
}

/// Refuse an incremental archive: it holds only what changed since its
/// parent, and restoring it alone would leave the rest as zeros.
pub fn refuse_incremental(header: &Header) -> Result<()> {
    match &header.parent {
        None => Ok(()),
        Some(p) => Err(Error::Invalid(format!(
            "this archive is incremental: it holds only what changed since its parent (uuid {}), so it cannot be restored or mounted on its own",
            crate::types::uuid_text(&p.uuid)
        ))),
    }
}

/// Make `bytes` of a drive file read as zeros.
fn zero_range(target: &mut DriveTarget, bytes: std::ops::Range<u64>) -> Result<()> {
    let cs = crate::format::CLUSTER_SIZE as u64;
    match target {
        DriveTarget::Raw { out, .. } => {
            // SAFETY: fallocate on a descriptor we own; no memory is touched.
            let r = unsafe {
                libc::fallocate(
                    out.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    bytes.start as libc::off_t,
                    (bytes.end - bytes.start) as libc::off_t,
                )
            };
            if r != 0 {
                let zeros = vec![0u8; 1 << 20];
                let mut at = bytes.start;
                while at < bytes.end {
                    let n = (bytes.end - at).min(zeros.len() as u64) as usize;
                    out.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
            }
            Ok(())
        }
        DriveTarget::Qcow2 { out, .. } => {
            for c in bytes.start / cs..bytes.end.div_ceil(cs) {
                out.zero_cluster(c)?;
            }
            Ok(())
        }
    }
}

/// What an incremental archive marks unchanged, filled from its ancestors
/// while the index is walked: each cluster is read from the chain, written
/// to its drive file, and its leaf handed on, so the drive digest checked
/// covers every byte written. With `salvage`, a cluster an ancestor cannot
/// give (damage) stays zeros and is listed; without it, the first such
/// error fails. Drives not extracted get their leaves from the chain's
/// leaf pages.
struct Fill<'a> {
    chain: &'a Chain,
    header: &'a Header,
    targets: &'a RefCell<Vec<Option<DriveTarget>>>,
    compressors: &'a RefCell<Vec<zstd::bulk::Compressor<'static>>>,
    salvage: bool,
    want_leaves: bool,
    lost: Vec<(DriveRange, Error)>,
}

impl LeafSource for Fill<'_> {
    fn leaves(
        &mut self,
        drive: &crate::format::DriveInfo,
        clusters: std::ops::Range<u64>,
        out: &mut dyn FnMut(LeafItem) -> Result<()>,
    ) -> Result<bool> {
        let cs = crate::format::CLUSTER_SIZE as u64;
        let Some(d) = self.header.drive(drive.id) else {
            return Ok(false);
        };
        let selected = self.targets.borrow()[d.id.0 as usize].is_some();
        if !selected {
            if !self.want_leaves {
                return Ok(false);
            }
            self.chain.leaves_of_point(&d.name, d.size, clusters, out)?;
            return Ok(true);
        }
        let mut buf = vec![0u8; cs as usize];
        let run_end = (clusters.end * cs).min(d.size);
        let mut pos = clusters.start * cs;
        let mut next_cluster = clusters.start;
        let mut whole = true;
        while pos < run_end {
            // Zero stretches of the ancestors cost one step each, however long.
            let (n, data) = match self.chain.status_named(&d.name, pos)? {
                crate::image::source::Stretch::Zero(n) => (n, false),
                crate::image::source::Stretch::Data(n) => (n, true),
            };
            let next = (pos + n.max(1)).min(run_end);
            let first = (pos / cs).max(next_cluster);
            let last = next.div_ceil(cs);
            if !data {
                // Clusters wholly inside the zero stretch.
                let zero_end = if next == run_end { last } else { next / cs };
                if zero_end > first {
                    if self.want_leaves {
                        out(LeafItem::Zeros(zero_end - first))?;
                    }
                    next_cluster = zero_end;
                }
                pos = next;
                continue;
            }
            for c in first..last {
                let len = cluster_len(d.size, ClusterNo(c));
                let bytes = &mut buf[..len];
                match self.chain.read_named(&d.name, c * cs, bytes) {
                    Ok(()) => {
                        let mut targets = self.targets.borrow_mut();
                        let target = targets[d.id.0 as usize].as_mut().expect("selected");
                        fill_cluster(target, c, bytes, &mut self.compressors.borrow_mut())?;
                        if self.want_leaves {
                            out(LeafItem::Leaf(crate::tree::leaf(bytes)))?;
                        }
                    }
                    Err(e) if self.salvage && e.is_damage() => {
                        whole = false;
                        let bytes = c * cs..c * cs + len as u64;
                        match self.lost.last_mut() {
                            Some((r, _)) if r.drive == d.id && r.bytes.end == bytes.start => {
                                r.bytes.end = bytes.end
                            }
                            _ => self.lost.push((
                                DriveRange {
                                    drive: d.id,
                                    drive_name: d.name.clone(),
                                    bytes,
                                },
                                e,
                            )),
                        }
                        if self.want_leaves {
                            out(LeafItem::Zeros(1))?;
                        }
                    }
                    Err(e) => return Err(e),
                }
                next_cluster = c + 1;
            }
            pos = next;
        }
        if self.want_leaves && next_cluster < clusters.end {
            out(LeafItem::Zeros(clusters.end - next_cluster))?;
        }
        Ok(whole && self.want_leaves)
    }
}

/// Write one cluster's bytes (`data`) to a drive file; all-zero clusters
/// stay holes.
fn fill_cluster(
    target: &mut DriveTarget,
    cluster: u64,
    data: &[u8],
    compressors: &mut [zstd::bulk::Compressor<'static>],
) -> Result<()> {
    let mask = crate::types::block_mask(data);
    if mask == 0 {
        return Ok(());
    }
    let cs = crate::format::CLUSTER_SIZE as u64;
    match target {
        DriveTarget::Raw { out, .. } => out.write_all_at(data, cluster * cs),
        DriveTarget::Qcow2 { out, compress, .. } => {
            let packed = match (compress, compressors.first_mut()) {
                (true, Some(zstd)) => compress_cluster(data, zstd)?,
                _ => None,
            };
            match packed {
                Some(bytes) => out.write_compressed(cluster, &bytes),
                None => out.write_blocks(cluster, mask, &stored_blocks(data, mask)),
            }
        }
    }
}

/// The 4 KiB blocks of `data` that `mask` marks, each padded to 4 KiB (the
/// form a stored cluster takes).
fn stored_blocks(data: &[u8], mask: u16) -> Vec<u8> {
    let mut blocks = Vec::with_capacity(data.len());
    for (i, b) in data.chunks(BLOCK_SIZE).enumerate() {
        if mask & (1 << i) != 0 {
            blocks.extend_from_slice(b);
            blocks.resize(blocks.len() + BLOCK_SIZE - b.len(), 0);
        }
    }
    blocks
}

/// Where one selected drive is written.
enum DriveTarget {
    /// A sparse raw file of the drive's size.
    Raw { out: AtomicFile, size: u64 },
    /// A qcow2 image.
    Qcow2 {
        out: Qcow2Writer,
        size: u64,
        compress: bool,
    },
}

/// Write the data clusters of one extent to the drive files selected;
/// zero clusters and zero blocks are never written.
fn write_extent(
    ext: &Arc<DecodedExtent>,
    targets: &mut [Option<DriveTarget>],
    compressors: &mut [zstd::bulk::Compressor<'static>],
) -> Result<()> {
    write_raw(ext, targets)?;
    let mut to_compress = Vec::new();
    for (drive, cluster, data) in ext.data_clusters() {
        let ClusterData::Data { mask, blocks } = data else {
            continue;
        };
        match &mut targets[drive.0 as usize] {
            Some(DriveTarget::Qcow2 {
                out,
                compress: false,
                ..
            }) => out.write_blocks(cluster.0, mask, blocks)?,
            Some(DriveTarget::Qcow2 {
                size,
                compress: true,
                ..
            }) => {
                let mut full = vec![0u8; cluster_len(*size, cluster)];
                data.expand_into(&mut full);
                to_compress.push((drive, cluster, full));
            }
            _ => {}
        }
    }
    if to_compress.is_empty() {
        return Ok(());
    }
    // Compress on every core, then store in archive order.
    let per_thread = to_compress.len().div_ceil(compressors.len().max(1));
    let compressed: Vec<Result<Vec<Option<Vec<u8>>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = to_compress
            .chunks(per_thread)
            .zip(compressors.iter_mut())
            .map(|(chunk, zstd)| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(_, _, data)| compress_cluster(data, zstd))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("compression thread"))
            .collect()
    });
    let mut results = Vec::with_capacity(to_compress.len());
    for part in compressed {
        results.extend(part?);
    }
    for ((drive, cluster, data), packed) in to_compress.iter().zip(results) {
        let Some(DriveTarget::Qcow2 { out, .. }) = &mut targets[drive.0 as usize] else {
            continue;
        };
        match packed {
            Some(bytes) => out.write_compressed(cluster.0, &bytes)?,
            None => {
                let mask = crate::types::block_mask(data);
                out.write_blocks(cluster.0, mask, &stored_blocks(data, mask))?;
            }
        }
    }
    Ok(())
}

/// Write the data clusters of one extent to the raw drive files selected,
/// coalescing contiguous blocks into single writes; zero blocks stay holes.
fn write_raw(ext: &Arc<DecodedExtent>, targets: &[Option<DriveTarget>]) -> Result<()> {
    let mut pending: Option<(DriveId, u64, &[u8])> = None;
    let flush = |p: &mut Option<(DriveId, u64, &[u8])>| -> Result<()> {
        if let Some((drive, offset, bytes)) = p.take() {
            if let Some(DriveTarget::Raw { out, .. }) = &targets[drive.0 as usize] {
                out.write_all_at(bytes, offset)?;
            }
        }
        Ok(())
    };
    for (drive, cluster, data) in ext.data_clusters() {
        let Some(DriveTarget::Raw { size, .. }) = &targets[drive.0 as usize] else {
            continue;
        };
        let ClusterData::Data { mask, blocks } = data else {
            continue;
        };
        let clen = cluster_len(*size, cluster);
        let mut stored = 0;
        for b in 0..16usize {
            if mask & (1 << b) == 0 {
                continue;
            }
            let block = &blocks[stored * BLOCK_SIZE..(stored + 1) * BLOCK_SIZE];
            stored += 1;
            let start = b * BLOCK_SIZE;
            if start >= clen {
                break;
            }
            let block = &block[..(clen - start).min(BLOCK_SIZE)];
            let offset = cluster.byte_offset() + start as u64;
            match &mut pending {
                Some((d, o, bytes))
                    if *d == drive
                        && *o + bytes.len() as u64 == offset
                        && bytes.as_ptr_range().end == block.as_ptr() =>
                {
                    // SAFETY: `bytes` and `block` are adjacent sub-slices of the same payload buffer.
                    *bytes = unsafe {
                        std::slice::from_raw_parts(bytes.as_ptr(), bytes.len() + block.len())
                    };
                }
                _ => {
                    flush(&mut pending)?;
                    pending = Some((drive, offset, block));
                }
            }
        }
    }
    flush(&mut pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{CLUSTER_SIZE, MAX_CLUSTERS};
    use crate::read::stream::tests::archive_with_zero_run;
    use std::time::{Duration, Instant};

    /// Salvage once stepped through every cluster of every zero run an
    /// extent claims, two billion of them for a one-cluster drive; it now
    /// looks only at data entries, and keeps the intact data cluster.
    #[test]
    fn salvage_of_a_zero_run_past_the_drive_end_costs_no_time() {
        let bytes = archive_with_zero_run((MAX_CLUSTERS - 1) as u32);
        let dir = tempfile::tempdir().unwrap();
        let options = ExtractOptions {
            salvage: true,
            threads: 1,
            ..ExtractOptions::default()
        };
        let started = Instant::now();
        let stream = ArchiveStream::open(&bytes[..], "test").unwrap();
        let summary = extract(stream, dir.path(), &options, None, |_| {}).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(!summary.report.is_clean());
        assert_eq!(
            std::fs::read(dir.path().join("d.raw")).unwrap(),
            [&[5u8; 4096][..], &[0u8; CLUSTER_SIZE - 4096][..]].concat()
        );
    }
}

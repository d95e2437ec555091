//! Bodies of the fuzz targets in `fuzz/` (one function per target), kept in
//! the library so that the seed and regression corpora are also replayed by
//! an ordinary `cargo test` (`tests/fuzz_corpus.rs`). Each drives the entry
//! points the commands use, on bytes held in memory, and panics only where
//! the library broke a promise: a panic inside the library, or two readers
//! returning different bytes for the same cluster.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::extent::DecodedExtent;
use crate::format::{RunKind, CLUSTER_SIZE};
use crate::image::qcow2::Qcow2Image;
use crate::image::source::{next_data_run, DiskImage, RawImage};
use crate::ops::verify::verify;
use crate::read::detect::open_any;
use crate::read::reader::Reader;
use crate::read::stream::{HashDrives, PassOptions};
use crate::types::{cluster_len, ClusterNo, DriveId};

/// Drives whose total size is at most this get their whole-content SHA-256
/// computed in the pass going past damage (hashing is linear in the
/// declared size, zeros included).
const HASH_DRIVES_UP_TO: u64 = 1 << 20;
/// Bytes of decoded clusters kept to compare the two readers.
const KEEP_CLUSTER_BYTES: usize = 32 << 20;
/// Bytes read through random access per input.
const READ_BUDGET: u64 = 8 << 20;

/// A file holding `data`, in memory (memfd), for the readers that take files.
pub fn memory_file(data: &[u8]) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the returned
    // descriptor is owned by the File from here on.
    let fd = unsafe { libc::memfd_create(c"vma-fuzz-input".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data).expect("writing to a memfd");
    file.rewind().expect("rewinding a memfd");
    file
}

/// Any archive bytes (native v2, VMA v1, whole-stream zstd/gzip): the
/// sequential pass (`extract -`, `verify -`), stopping at the first problem
/// and going on past damage; `verify FILE`; random access through the index
/// (`mount`, `extract FILE`), reading every drive's start, end and a spread
/// of runs.
/// Where both readers accept the archive, every cluster the pass decoded
/// must read back identically through random access.
pub fn archive(data: &[u8]) -> ArchiveOutcome {
    sequential_pass(data, false);
    let pass = sequential_pass(data, true);
    let mut outcome = ArchiveOutcome {
        pass_clean: matches!(pass, Some((_, true))),
        ..ArchiveOutcome::default()
    };
    let file = memory_file(data);
    // `vma verify FILE`: the pass, then drives stored out of order hashed
    // again through random access on the same file.
    if let Ok((stream, _)) = open_any(Cursor::new(data.to_vec()), "fuzz-input") {
        let total: u64 = stream.header().drives.iter().map(|d| d.size).sum();
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let _ = verify(stream, 1, total <= HASH_DRIVES_UP_TO, Some(&path));
    }
    if let Ok(reader) = Reader::open_file(file, Path::new("fuzz-input")) {
        outcome.opened = true;
        random_access(&reader);
        if let Some((clusters, true)) = &pass {
            compare(&reader, clusters);
            outcome.clusters_compared = clusters.len();
        }
    }
    outcome
}

/// What [`archive`] found (for tests of the corpora).
#[derive(Debug, Default)]
pub struct ArchiveOutcome {
    /// The sequential pass found nothing wrong.
    pub pass_clean: bool,
    /// The archive opened for random access.
    pub opened: bool,
    /// Clusters read through both readers and found identical.
    pub clusters_compared: usize,
}

/// Decoded clusters by (drive, cluster), expanded to their bytes.
type Clusters = HashMap<(DriveId, u64), Vec<u8>>;

/// One pass over `data`: the clusters it decoded and whether it found
/// nothing wrong, unless it failed.
fn sequential_pass(data: &[u8], keep_going: bool) -> Option<(Clusters, bool)> {
    let (stream, _) = open_any(Cursor::new(data.to_vec()), "fuzz-input").ok()?;
    let header = stream.header().clone();
    let total: u64 = header.drives.iter().map(|d| d.size).sum();
    let options = PassOptions {
        threads: 1,
        keep_going,
        hash_drives: if keep_going && total <= HASH_DRIVES_UP_TO {
            HashDrives::All
        } else {
            HashDrives::None
        },
        ..Default::default()
    };
    let mut clusters = Clusters::new();
    let mut kept = 0usize;
    let report = stream
        .pass(&options, |ext: &Arc<DecodedExtent>| {
            for (drive, cluster, contents) in ext.data_clusters() {
                let Some(info) = header.drive(drive) else {
                    continue;
                };
                if cluster.0 >= info.clusters() || kept >= KEEP_CLUSTER_BYTES {
                    continue;
                }
                let mut bytes = vec![0u8; cluster_len(info.size, cluster)];
                contents.expand_into(&mut bytes);
                kept += bytes.len();
                clusters.insert((drive, cluster.0), bytes);
            }
            Ok(())
        })
        .ok()?;
    Some((clusters, report.is_clean()))
}

/// Read the start and end of every drive and the first cluster of runs
/// spread over it, within [`READ_BUDGET`]; errors are fine, panics are not.
fn random_access(reader: &Reader) {
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; 2 * CLUSTER_SIZE + 3];
    let drives = reader.header().drives.clone();
    for d in &drives {
        let runs: Vec<_> = reader
            .runs(d.id)
            .map(|it| it.take(1 << 16).filter_map(|r| r.ok()).collect())
            .unwrap_or_default();
        let step = runs.len() / 16 + 1;
        let mut offsets = vec![0, d.size.saturating_sub(buf.len() as u64), d.size / 2 + 1];
        offsets.extend(
            runs.iter()
                .step_by(step)
                .map(|r| r.start * CLUSTER_SIZE as u64),
        );
        for offset in offsets {
            let len = (buf.len() as u64).min(d.size.saturating_sub(offset));
            if budget < len {
                return;
            }
            budget -= len;
            let _ = reader.read_at(d.id, offset, &mut buf[..len as usize]);
            let _ = reader.extents_to_prefetch(d.id, offset..offset + len);
        }
        // Past the end must be refused, not read.
        assert!(
            reader.read_at(d.id, d.size, &mut [0u8; 1]).is_err(),
            "a read past the end of drive {} succeeded",
            d.name
        );
        for r in runs.iter().step_by(step) {
            let _ = reader.run_at(d.id, ClusterNo(r.start));
            if r.kind == RunKind::Data {
                let _ = reader.ranges_in_extent(r.extent);
                let _ = reader.leaf(d.id, r.start);
            }
        }
    }
}

/// Every cluster the sequential pass decoded reads the same through the index.
fn compare(reader: &Reader, clusters: &Clusters) {
    let mut buf = vec![0u8; CLUSTER_SIZE];
    for ((drive, cluster), expected) in clusters {
        let at = ClusterNo(*cluster).byte_offset();
        let got = &mut buf[..expected.len()];
        match reader.read_at(*drive, at, got) {
            Ok(()) => assert!(
                got == &expected[..],
                "drive {drive} cluster {cluster}: random access and the sequential pass disagree"
            ),
            // Both readers accepted the archive, so the index must lead to
            // what the pass found.
            Err(e) => panic!(
                "drive {drive} cluster {cluster}: the pass decoded it, random access failed: {e}"
            ),
        }
    }
}

/// qcow2 image bytes, as `create` reads a source image: open (a backing
/// chain resolves to the same bytes again, up to three levels, or to them
/// as a raw image), find the data runs, read them within [`READ_BUDGET`].
pub fn qcow2(data: &[u8]) -> Qcow2Outcome {
    let Ok(image) = qcow2_from_memory(data, 0) else {
        return Qcow2Outcome::default();
    };
    let mut outcome = Qcow2Outcome {
        opened: true,
        ..Qcow2Outcome::default()
    };
    let size = image.size();
    let mut budget = READ_BUDGET;
    let mut buf = Vec::new();
    let mut next = 0;
    while let Ok(Some(run)) = next_data_run(&image, next) {
        assert!(
            run.start >= next && run.end > run.start,
            "data runs go backwards: {run:?} after {next}"
        );
        next = run.end;
        let start = run.start * CLUSTER_SIZE as u64;
        let end = (run.end * CLUSTER_SIZE as u64).min(size);
        assert!(
            start < end,
            "data run {run:?} lies past the image size {size}"
        );
        let len = (end - start).min(budget).min(4 << 20);
        if len == 0 {
            break;
        }
        budget -= len;
        buf.resize(len as usize, 0);
        if image.read_at(&mut buf, start).is_ok() {
            outcome.data_bytes_read += len;
        }
    }
    // Unaligned reads across cluster boundaries.
    for offset in [0, 511, size / 3, size.saturating_sub(70_000)] {
        let len = 70_000u64.min(size.saturating_sub(offset));
        buf.resize(len as usize, 0);
        let _ = image.read_at(&mut buf, offset);
    }
    outcome
}

/// What [`qcow2`] found (for tests of the corpora).
#[derive(Debug, Default)]
pub struct Qcow2Outcome {
    /// The image (and its backing chain) opened.
    pub opened: bool,
    /// Bytes of data runs read without error.
    pub data_bytes_read: u64,
}

fn qcow2_from_memory(data: &[u8], depth: usize) -> Result<Qcow2Image> {
    let open_backing = |_: &Path, _: &str, format: Option<&str>, depth: usize| {
        if format == Some("raw") || depth >= 3 {
            let image = RawImage::open_file(memory_file(data), Path::new("fuzz-backing"))?;
            Ok(Box::new(image) as Box<dyn DiskImage>)
        } else {
            Ok(Box::new(qcow2_from_memory(data, depth + 1)?) as Box<dyn DiskImage>)
        }
    };
    Qcow2Image::open_file(
        memory_file(data),
        Path::new("fuzz.qcow2"),
        depth,
        &open_backing,
    )
}

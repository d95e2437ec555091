//! Archives with many index runs, made with the Writer API, and the peak
//! memory and time of `vma` commands on them: what shows that resources do
//! not grow with what an archive holds (`tests/scale.rs`, `bench/scale.sh`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vma_core::chain::Chain;
use vma_core::format::CLUSTER_SIZE;
use vma_core::{ArchiveMeta, ClusterNo, DriveId, DriveInfo, Reader, Writer, WriterOptions};

/// A data cluster: one non-zero 4 KiB block (its number), the rest zeros;
/// it still needs its 64 KiB leaf hash.
fn cluster(c: u64, buf: &mut [u8]) {
    buf.fill(0);
    for (i, w) in buf[..4096].chunks_mut(8).enumerate() {
        w.copy_from_slice(&(c ^ (i as u64) << 40).to_le_bytes());
    }
}

fn drive(clusters: u64) -> DriveInfo {
    DriveInfo {
        id: DriveId(1),
        name: "disk".into(),
        size: clusters * CLUSTER_SIZE as u64,
    }
}

/// A full archive of one drive of `clusters` clusters, every other one
/// data (so every cluster is a run of its own): `clusters` index runs.
pub fn alternating(path: &Path, clusters: u64, progress: &mut dyn FnMut(u64)) {
    let mut w = Writer::new(
        std::fs::File::create(path).unwrap(),
        ArchiveMeta::new(vec![drive(clusters)], vec![]),
        &WriterOptions::default(),
    )
    .unwrap();
    let mut buf = vec![0u8; CLUSTER_SIZE];
    for c in 0..clusters {
        if c % 2 == 0 {
            cluster(c, &mut buf);
            w.write_cluster(DriveId(1), ClusterNo(c), &buf).unwrap();
        } else {
            w.write_zeros(DriveId(1), c..c + 1).unwrap();
        }
        if c % (1 << 16) == 0 {
            progress(c);
        }
    }
    w.finish().unwrap();
}

/// A full archive of one all-zero drive of `clusters` clusters.
pub fn zeros(path: &Path, clusters: u64) {
    let mut w = Writer::new(
        std::fs::File::create(path).unwrap(),
        ArchiveMeta::new(vec![drive(clusters)], vec![]),
        &WriterOptions::default(),
    )
    .unwrap();
    w.write_zeros(DriveId(1), 0..clusters).unwrap();
    w.finish().unwrap();
}

/// An incremental archive on top of `parent` (an all-zero drive of
/// `clusters` clusters): one cluster in 32 is data, the others alternate
/// zero and unchanged, so every cluster is a run of its own (`clusters`
/// index runs) while little is hashed.
pub fn sparse_incremental(path: &Path, parent: &Path, clusters: u64) {
    let mut meta = ArchiveMeta::new(vec![drive(clusters)], vec![]);
    meta.parent = Some(Reader::open(parent).unwrap().identity().unwrap());
    let mut w = Writer::new(
        std::fs::File::create(path).unwrap(),
        meta,
        &WriterOptions::default(),
    )
    .unwrap();
    w.set_leaf_source(Arc::new(Chain::open(parent, &[]).unwrap()).leaf_source());
    let mut buf = vec![0u8; CLUSTER_SIZE];
    for c in 0..clusters {
        if c % 32 == 0 {
            cluster(c, &mut buf);
            w.write_cluster(DriveId(1), ClusterNo(c), &buf).unwrap();
        } else if c % 2 == 1 {
            w.write_zeros(DriveId(1), c..c + 1).unwrap();
        } else {
            w.write_unchanged(DriveId(1), c..c + 1).unwrap();
        }
    }
    w.finish().unwrap();
}

/// A tiny archive declaring 255 all-zero drives of 128 TiB.
pub fn huge(path: &Path) {
    let drives: Vec<DriveInfo> = (1..=255u8)
        .map(|i| DriveInfo {
            id: DriveId(i),
            name: format!("d{i}"),
            size: vma_core::format::limits::MAX_DRIVE_SIZE,
        })
        .collect();
    let mut w = Writer::new(
        std::fs::File::create(path).unwrap(),
        ArchiveMeta::new(drives.clone(), vec![]),
        &WriterOptions::default(),
    )
    .unwrap();
    for d in &drives {
        w.write_zeros(d.id, 0..d.clusters()).unwrap();
    }
    w.finish().unwrap();
}

/// Peak RSS (KiB), wall time, exit code and output of `vma ARGS` (a shell
/// fragment; `$VMA` is the binary), run under /usr/bin/time.
pub fn measure(args: &str) -> (u64, Duration, i32, String) {
    crate::require("/usr/bin/time");
    let started = Instant::now();
    let o = crate::sh(&format!("/usr/bin/time -f 'maxrss %M' \"$VMA\" {args}"));
    let took = started.elapsed();
    let out = format!("{}{}", crate::stdout(&o), crate::stderr(&o));
    let rss = out
        .lines()
        .filter_map(|l| l.strip_prefix("maxrss "))
        .next_back()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no maxrss from /usr/bin/time: {out}"));
    (rss, took, crate::code(&o), out)
}

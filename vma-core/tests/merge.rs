//! Property tests of synthetic fulls: random chains of five or more links
//! (random drives, ids, odd sizes, writes, write orders, compression and
//! extent sizes) merged into one archive that equals the newest point byte
//! for byte, verifies clean and holds every cluster exactly once; extents
//! copied as stored and extents encoded again mixed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use vma_core::chain::Chain;
use vma_core::format::{RunKind, CLUSTER_SIZE};
use vma_core::ops::merge::{merge_chain, synthetic_meta, MergeOptions, MergeSummary};
use vma_core::read::reader::Reader;
use vma_core::read::stream::{ArchiveStream, DriveDigestCheck};
use vma_core::types::{clusters_for, ClusterNo};
use vma_core::{ArchiveMeta, Compression, ConfigBlob, DriveId, DriveInfo, Writer, WriterOptions};

const CS: u64 = CLUSTER_SIZE as u64;

/// A tiny xorshift for the test's own choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// New contents for one cluster of `len` bytes: zeros, noise, or a few
/// non-zero blocks.
fn cluster_content(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    match rng.below(4) {
        0 => {}
        1 => {
            let block = rng.below(16) as usize * 4096;
            if block < len {
                out[block] = rng.below(255) as u8 + 1;
            }
        }
        _ => {
            for b in out.iter_mut() {
                *b = rng.next() as u8;
            }
        }
    }
    out
}

/// One drive as the chain knows it.
#[derive(Clone)]
struct Disk {
    name: String,
    data: Vec<u8>,
}

/// A chain written by the test: archive paths oldest first, and each
/// point's drives.
struct TestChain {
    paths: Vec<PathBuf>,
    points: Vec<Vec<Disk>>,
}

/// Increasing random drive ids for `n` drives.
fn ids(rng: &mut Rng, n: usize) -> Vec<DriveId> {
    let mut id = 0u64;
    (0..n)
        .map(|_| {
            id += 1 + rng.below(3);
            DriveId(id as u8)
        })
        .collect()
}

fn writer_options(rng: &mut Rng) -> WriterOptions {
    WriterOptions {
        compression: if rng.below(3) == 0 {
            Compression::None
        } else {
            Compression::Zstd(1)
        },
        threads: 1 + rng.below(2) as usize,
        extent_payload: 4096 << rng.below(5),
    }
}

/// Write one archive: `disks` as its drives; with `parent`, only the
/// clusters in `changed` (per drive, by name) are stored and the rest are
/// marked unchanged. Clusters are submitted in a random order, drives
/// interleaved, so extents mix drives and hold runs of any order.
fn write_archive(
    path: &Path,
    disks: &[Disk],
    parent: Option<(&Path, &[Disk])>,
    changed: &[Vec<bool>],
    rng: &mut Rng,
) {
    let ids = ids(rng, disks.len());
    let drives: Vec<DriveInfo> = disks
        .iter()
        .zip(&ids)
        .map(|(d, &id)| DriveInfo {
            id,
            name: d.name.clone(),
            size: d.data.len() as u64,
        })
        .collect();
    let mut meta = ArchiveMeta::new(drives.clone(), vec![]);
    let mut chain = None;
    if let Some((p, _)) = parent {
        meta.parent = Some(Reader::open(p).unwrap().identity().unwrap());
        chain = Some(Arc::new(Chain::open(p, &[]).unwrap()));
    }
    let options = writer_options(rng);
    let mut w = Writer::new(std::fs::File::create(path).unwrap(), meta, &options).unwrap();
    if let Some(c) = &chain {
        w.set_leaf_source(c.leaf_source());
    }
    let mut work: Vec<(usize, u64)> = Vec::new();
    for (i, d) in drives.iter().enumerate() {
        for c in 0..d.clusters() {
            work.push((i, c));
        }
    }
    // Shuffle in chunks so that some stretches stay in order.
    let mut k = work.len();
    while k > 1 {
        let j = rng.below(k as u64) as usize;
        if rng.below(3) != 0 {
            work.swap(k - 1, j);
        }
        k -= 1;
    }
    for (i, c) in work {
        let d = &drives[i];
        let in_parent = parent.is_some_and(|(_, pd)| {
            pd.iter()
                .any(|p| p.name == d.name && p.data.len() as u64 == d.size)
        });
        if in_parent && !changed[i][c as usize] {
            w.write_unchanged(d.id, c..c + 1).unwrap();
            continue;
        }
        let s = (c * CS) as usize;
        let e = ((c + 1) * CS).min(d.size) as usize;
        w.write_cluster(d.id, ClusterNo(c), &disks[i].data[s..e])
            .unwrap();
    }
    w.finish().unwrap();
}

/// A random chain of `links` archives in `dir`.
fn random_chain(dir: &Path, seed: u64, links: usize) -> TestChain {
    let mut rng = Rng(seed | 1);
    let n = 1 + rng.below(3) as usize;
    let mut disks: Vec<Disk> = (0..n)
        .map(|i| {
            let clusters = 1 + rng.below(40);
            let size = clusters * CS - rng.below(3) * 1000;
            let mut data = Vec::with_capacity(size as usize);
            for c in 0..clusters {
                let len = (((c + 1) * CS).min(size) - c * CS) as usize;
                data.extend(cluster_content(&mut rng, len));
            }
            Disk {
                name: format!("drive-{i}"),
                data,
            }
        })
        .collect();
    let mut chain = TestChain {
        paths: Vec::new(),
        points: Vec::new(),
    };
    for link in 0..links {
        let path = dir.join(format!("{link}.vma"));
        let mut changed: Vec<Vec<bool>> = Vec::new();
        if link > 0 {
            // Now and then a drive is added, or one is dropped.
            if rng.below(5) == 0 && disks.len() < 4 {
                let size = (1 + rng.below(10)) * CS - 512;
                let mut data = vec![0u8; size as usize];
                for b in data.iter_mut().step_by(777) {
                    *b = rng.next() as u8 | 1;
                }
                disks.push(Disk {
                    name: format!("added-{link}"),
                    data,
                });
            } else if rng.below(6) == 0 && disks.len() > 1 {
                let i = rng.below(disks.len() as u64) as usize;
                disks.remove(i);
            }
            for d in &mut disks {
                let clusters = clusters_for(d.data.len() as u64);
                let mut marks = vec![false; clusters as usize];
                for _ in 0..rng.below(clusters / 3 + 2) {
                    let c = rng.below(clusters);
                    marks[c as usize] = true;
                    let s = (c * CS) as usize;
                    let e = ((c + 1) * CS).min(d.data.len() as u64) as usize;
                    let new = cluster_content(&mut rng, e - s);
                    d.data[s..e].copy_from_slice(&new);
                }
                changed.push(marks);
            }
        }
        let parent = chain.paths.last().cloned();
        let parent_disks = chain.points.last().cloned();
        write_archive(
            &path,
            &disks,
            parent.as_deref().zip(parent_disks.as_deref()),
            &changed,
            &mut rng,
        );
        chain.paths.push(path);
        chain.points.push(disks.clone());
    }
    chain
}

/// Merge the chain ending at `newest` into `out`.
fn merge_into(newest: &Path, out: &Path, options: &WriterOptions) -> MergeSummary {
    let chain = Arc::new(Chain::open(newest, &[]).unwrap());
    let meta = synthetic_meta(&chain);
    let mut w = Writer::new(std::fs::File::create(out).unwrap(), meta, options).unwrap();
    let merge_options = MergeOptions { threads: 2 };
    let summary = merge_chain(&chain, &mut w, &merge_options, &mut |_, _, _| {}).unwrap();
    w.finish().unwrap();
    summary
}

/// The merged archive holds exactly `want`, every cluster once, verifies
/// clean (drive digests included), and stands in for the newest link.
fn check_merged(merged: &Path, newest: &Path, want: &[Disk], s: &MergeSummary) {
    let r = Reader::open(merged).unwrap();
    let h = r.header();
    assert!(h.parent.is_none());
    let newest_r = Reader::open(newest).unwrap();
    assert_eq!(h.stands_for[0], newest_r.identity().unwrap());
    assert_eq!(r.state_digest(), newest_r.identity().unwrap().state);
    assert_eq!(h.ctime, newest_r.header().ctime);
    assert_eq!(h.drives, newest_r.header().drives);
    assert_eq!(h.drives.len(), want.len());
    let mut data_clusters = 0;
    for (d, disk) in h.drives.iter().zip(want) {
        assert_eq!(d.name, disk.name);
        let mut got = vec![0xA5u8; d.size as usize];
        r.read_at(d.id, 0, &mut got).unwrap();
        assert!(
            got == disk.data,
            "drive {} differs from the newest point",
            d.name
        );
        // Every cluster exactly once: the runs tile the drive.
        let mut next = 0;
        for run in r.runs(d.id).unwrap().map(Result::unwrap) {
            assert_eq!(run.start, next);
            assert_ne!(run.kind, RunKind::Unchanged);
            next += run.count as u64;
            if run.kind == RunKind::Data {
                data_clusters += run.count as u64;
            }
        }
        assert_eq!(next, d.clusters());
        let record = r.record(d.id).unwrap();
        assert_eq!(
            record.digest,
            Some(vma_core::tree::digest_of_bytes(&disk.data))
        );
    }
    assert_eq!(s.copied_clusters + s.reencoded_clusters, data_clusters);
    let stream = ArchiveStream::open(std::fs::File::open(merged).unwrap(), "merged").unwrap();
    let report = vma_core::ops::verify::verify(stream, 2, true, Some(merged)).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    for c in &report.digests {
        assert!(matches!(c, DriveDigestCheck::Match(_)), "{c:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn a_merged_chain_is_its_newest_point(seed in any::<u64>(), extra in 0usize..3, zstd in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let chain = random_chain(dir.path(), seed, 5 + extra);
        let newest = chain.paths.last().unwrap();
        let merged = dir.path().join("merged.out");
        let options = WriterOptions {
            compression: if zstd { Compression::Zstd(1) } else { Compression::None },
            threads: 2,
            ..Default::default()
        };
        let s = merge_into(newest, &merged, &options);
        check_merged(&merged, newest, chain.points.last().unwrap(), &s);
    }
}

/// A chain whose full was written in order, each incremental changing a
/// few clusters: most of the full's extents are copied as stored, those
/// holding a changed cluster are encoded again, and so is everything of a
/// link written with other compression.
#[test]
fn copies_untouched_extents_and_encodes_partly_superseded_ones() {
    let dir = tempfile::tempdir().unwrap();
    let size = 200 * CS - 4096;
    let mut rng = Rng(7);
    let mut disk = Disk {
        name: "disk".into(),
        data: (0..size).map(|_| rng.next() as u8).collect(),
    };
    let options = WriterOptions {
        extent_payload: 4 * CLUSTER_SIZE,
        ..Default::default()
    };
    let drive = DriveInfo {
        id: DriveId(1),
        name: "disk".into(),
        size,
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for link in 0..6u64 {
        let path = dir.path().join(format!("{link}.vma"));
        let mut meta = ArchiveMeta::new(vec![drive.clone()], vec![]);
        let changed: Vec<u64> = if link == 0 {
            (0..200).collect()
        } else {
            vec![link * 30, link * 30 + 1, 197]
        };
        if let Some(p) = paths.last() {
            meta.parent = Some(Reader::open(p).unwrap().identity().unwrap());
        }
        let link_options = WriterOptions {
            // Link 3 is uncompressed: its extents are encoded again.
            compression: if link == 3 {
                Compression::None
            } else {
                Compression::Zstd(1)
            },
            ..options.clone()
        };
        let mut w =
            Writer::new(std::fs::File::create(&path).unwrap(), meta, &link_options).unwrap();
        if let Some(p) = paths.last() {
            w.set_leaf_source(Arc::new(Chain::open(p, &[]).unwrap()).leaf_source());
        }
        let mut next = 0;
        for &c in &changed {
            if c > next {
                w.write_unchanged(DriveId(1), next..c).unwrap();
            }
            let s = (c * CS) as usize;
            let e = ((c + 1) * CS).min(size) as usize;
            if link > 0 {
                for b in &mut disk.data[s..e] {
                    *b = rng.next() as u8;
                }
            }
            w.write_cluster(DriveId(1), ClusterNo(c), &disk.data[s..e])
                .unwrap();
            next = c + 1;
        }
        if next < 200 {
            w.write_unchanged(DriveId(1), next..200).unwrap();
        }
        w.finish().unwrap();
        paths.push(path);
    }
    let merged = dir.path().join("merged.out");
    let s = merge_into(paths.last().unwrap(), &merged, &options);
    check_merged(&merged, paths.last().unwrap(), &[disk], &s);
    // The full's 50 extents of 4 clusters: 6 hold changed clusters (30-31,
    // 60-61, 90-91, 120-121, 150-151, 196-199). Links 1, 2, 4 and 5 each have
    // one extent of 3 clusters, all but 197 current (197 is superseded by
    // every later link): only link 5's is copied whole.
    assert_eq!(s.links, 6);
    assert_eq!(s.copied_extents, 44 + 1);
    assert_eq!(s.copied_clusters, 44 * 4 + 3);
    // 6 of the full, 1 each of links 1, 2 and 4, link 3's.
    assert_eq!(s.reencoded_extents, 6 + 3 + 1);
    assert_eq!(s.reencoded_clusters, 6 * 4 - 11 + 3 * 2 + 2);
    assert_eq!(s.reread_extents, 0);
}

/// Write an archive of one small drive with time `ctime` on top of
/// `parent` (every cluster but the first unchanged), optionally interrupted.
fn small_link(path: &Path, ctime: i64, parent: Option<&Path>, interrupted: bool) {
    small_link_with(path, ctime, parent, interrupted, vec![]);
}

/// [`small_link`] storing `configs`.
fn small_link_with(
    path: &Path,
    ctime: i64,
    parent: Option<&Path>,
    interrupted: bool,
    configs: Vec<ConfigBlob>,
) {
    let drive = DriveInfo {
        id: DriveId(1),
        name: "d".into(),
        size: 3 * CS,
    };
    let mut meta = ArchiveMeta::new(vec![drive], configs);
    meta.ctime = ctime;
    if let Some(p) = parent {
        meta.parent = Some(Reader::open(p).unwrap().identity().unwrap());
    }
    let mut w = Writer::new(
        std::fs::File::create(path).unwrap(),
        meta,
        &WriterOptions::default(),
    )
    .unwrap();
    if let Some(p) = parent {
        w.set_leaf_source(Arc::new(Chain::open(p, &[]).unwrap()).leaf_source());
    }
    w.write_cluster(DriveId(1), ClusterNo(0), &vec![ctime as u8; CLUSTER_SIZE])
        .unwrap();
    if parent.is_some() {
        w.write_unchanged(DriveId(1), 1..3).unwrap();
    } else {
        w.write_zeros(DriveId(1), 1..3).unwrap();
    }
    if interrupted {
        w.mark_interrupted(DriveId(1)).unwrap();
    }
    w.finish().unwrap();
}

/// The newest points over all chains are kept: an older chain goes whole,
/// the oldest kept point of a chain is folded, interrupted captures are no
/// points but stay when they are newer than a kept point.
#[test]
fn prune_plans_keep_the_newest_points_over_every_chain() {
    use vma_core::ops::prune::{archives_in, plan_prune};
    let dir = tempfile::tempdir().unwrap();
    let at = |n: &str| dir.path().join(n);
    small_link(&at("a0"), 100, None, false);
    small_link(&at("a1"), 110, Some(&at("a0")), false);
    small_link(&at("b0"), 200, None, false);
    small_link(&at("b1"), 210, Some(&at("b0")), false);
    small_link(&at("b2"), 220, Some(&at("b1")), false);
    small_link(&at("b3"), 230, Some(&at("b2")), true);
    std::fs::write(at(".b4.partial-1"), b"being written").unwrap();
    let all = archives_in(dir.path()).unwrap();
    assert_eq!(all.len(), 6, "hidden files are not pruned");
    let beside = vma_core::ops::prune::files_in(dir.path()).unwrap();
    let plan = plan_prune(&all, 2, &beside).unwrap();
    assert_eq!(plan.chains.len(), 2);
    let (a, b) = (&plan.chains[0], &plan.chains[1]);
    assert_eq!(a.fold, None);
    assert_eq!(a.delete, vec![at("a1"), at("a0")]);
    assert!(a.keep.is_empty());
    assert_eq!(b.fold, Some(at("b1")));
    assert_eq!(b.delete, vec![at("b0")]);
    assert_eq!(b.keep, vec![at("b2"), at("b3")]);
    // Keeping more than there are points changes nothing.
    assert!(plan_prune(&all, 9, &beside).unwrap().is_empty());
    assert!(plan_prune(&all, 0, &beside).is_err());
}

/// A stored extent is claimed like any submission, and a zstd extent needs
/// an archive with the ZSTD feature.
#[test]
fn append_stored_checks_like_any_submission() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vma");
    small_link(&src, 1, None, false);
    let r = Reader::open(&src).unwrap();
    let key = r.runs(DriveId(1)).unwrap().next().unwrap().unwrap().extent;
    let drive = r.header().drives.clone();
    let new_writer = |compression| {
        Writer::new(
            Vec::new(),
            ArchiveMeta::new(drive.clone(), vec![]),
            &WriterOptions {
                compression,
                ..Default::default()
            },
        )
        .unwrap()
    };
    // The small link's extent is zstd-compressed (its cluster repeats a byte).
    let mut plain = new_writer(Compression::None);
    let err = plain
        .append_stored(r.stored_extent(key).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("zstd"), "{err}");
    // The same clusters twice: found when the index is built.
    let mut twice = new_writer(Compression::Zstd(1));
    twice.append_stored(r.stored_extent(key).unwrap()).unwrap();
    twice.append_stored(r.stored_extent(key).unwrap()).unwrap();
    let err = twice.finish().err().unwrap();
    assert!(err.to_string().contains("twice"), "{err}");
    let mut w = new_writer(Compression::Zstd(1));
    w.append_stored(r.stored_extent(key).unwrap()).unwrap();
    // Copied as it was: the same payload, a new digest, a valid archive.
    let (bytes, _) = w.finish().unwrap();
    let copy = dir.path().join("copy.vma");
    std::fs::write(&copy, &bytes).unwrap();
    let c = Reader::open(&copy).unwrap();
    let mut a = vec![0u8; 3 * CLUSTER_SIZE];
    let mut b = a.clone();
    r.read_at(DriveId(1), 0, &mut a).unwrap();
    c.read_at(DriveId(1), 0, &mut b).unwrap();
    assert!(a == b);
    let stream = ArchiveStream::open(&bytes[..], "copy").unwrap();
    assert!(vma_core::ops::verify::verify(stream, 1, true, None)
        .unwrap()
        .is_clean());
}

/// In a chain whose incrementals store no configs (as written before
/// configs were carried forward), every point takes them from the full;
/// the synthetic full of a point keeps them, and a prune whose fold lost
/// them is refused before anything is deleted.
#[test]
fn configs_of_every_point_survive_merge_and_prune() {
    use vma_core::chain::configs::ConfigSource;
    use vma_core::ops::prune::{check_configs_kept, kept_point_configs, plan_prune};
    let dir = tempfile::tempdir().unwrap();
    let at = |n: &str| dir.path().join(n);
    let conf = ConfigBlob {
        name: "qemu-server.conf".into(),
        data: b"cores: 2\n".to_vec(),
    };
    small_link_with(&at("c0"), 100, None, false, vec![conf.clone()]);
    small_link(&at("c1"), 110, Some(&at("c0")), false);
    small_link(&at("c2"), 120, Some(&at("c1")), false);
    small_link(&at("c3"), 130, Some(&at("c2")), false);
    let all: Vec<PathBuf> = ["c0", "c1", "c2", "c3"].iter().map(|n| at(n)).collect();
    let c0_uuid = Reader::open(&at("c0")).unwrap().header().uuid;
    let chain = Arc::new(Chain::open(&at("c2"), &[]).unwrap());
    let point = chain.point_configs();
    assert_eq!(point.blobs(), vec![conf.clone()]);
    assert_eq!(
        point.configs[0].1,
        ConfigSource::Ancestor {
            uuid: c0_uuid,
            path: at("c0")
        }
    );
    assert_eq!(synthetic_meta(&chain).configs, vec![conf.clone()]);

    let plan = plan_prune(&all, 2, &all).unwrap();
    assert_eq!(plan.chains[0].fold, Some(at("c2")));
    let before = kept_point_configs(&plan, &all).unwrap();
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|(_, c)| c == &vec![conf.clone()]));
    let remaining = vec![at("c2"), at("c3")];
    // A fold that dropped the configs (as merges did before): refused.
    let write_fold = |keep_configs: bool| {
        let mut meta = synthetic_meta(&chain);
        if !keep_configs {
            meta.configs.clear();
        }
        let tmp = at(&format!("fold-{keep_configs}.tmp"));
        let mut w = Writer::new(
            std::fs::File::create(&tmp).unwrap(),
            meta,
            &WriterOptions::default(),
        )
        .unwrap();
        merge_chain(&chain, &mut w, &MergeOptions::default(), &mut |_, _, _| {}).unwrap();
        w.finish().unwrap();
        tmp
    };
    let lost = write_fold(false);
    let kept = write_fold(true);
    std::fs::rename(&lost, at("c2")).unwrap();
    let e = check_configs_kept(&plan, &before, &remaining).unwrap_err();
    assert!(e.to_string().contains("qemu-server.conf"), "{e}");
    std::fs::rename(&kept, at("c2")).unwrap();
    check_configs_kept(&plan, &before, &remaining).unwrap();
    let c3 = Chain::open(&at("c3"), &remaining).unwrap();
    assert_eq!(c3.point_configs().blobs(), vec![conf]);
}

//! The index builder against a naive model: random drives and cluster
//! kinds, records given in random order with little memory (so that chunks
//! spill and merge), then every run, leaf and drive digest read back
//! through the paged index.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::format::{DriveInfo, CLUSTER_SIZE};
use crate::tree::leaf;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Data(u8),
    Zero,
}

fn drives(sizes: &[u64]) -> Vec<DriveInfo> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| DriveInfo {
            id: DriveId(i as u8 * 3 + 1),
            name: format!("d{i}"),
            size,
        })
        .collect()
}

/// The bytes of a data cluster.
fn cluster_bytes(d: usize, c: u64, seed: u8, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    if len > 0 {
        v[(c as usize * 131 + d) % len] = seed | 1;
    }
    v
}

/// Shuffle with a small generator (deterministic per case).
fn shuffle<T>(v: &mut [T], mut x: u64) {
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn builds_what_a_naive_model_says(
        sizes in proptest::collection::vec(0u64..(40 * CLUSTER_SIZE as u64), 1..4),
        pattern in proptest::collection::vec((0u8..3, 1u64..6), 1..40),
        per_extent in 1usize..9,
        order in any::<u64>(),
    ) {
        let drives = drives(&sizes);
        // Each drive's clusters, with kinds from the pattern.
        let mut kinds: Vec<Vec<Kind>> = Vec::new();
        let mut pat = pattern.iter().cycle();
        for d in &drives {
            let n = d.clusters() as usize;
            let mut k = Vec::with_capacity(n);
            while k.len() < n {
                let &(what, len) = pat.next().unwrap();
                for _ in 0..len {
                    if k.len() == n { break; }
                    k.push(if what == 0 { Kind::Zero } else { Kind::Data(what) });
                }
            }
            kinds.push(k);
        }
        // Records: one entry per cluster, grouped into "extents" of
        // `per_extent` clusters in cluster order, then shuffled.
        let mut items: Vec<(usize, u64)> = Vec::new();
        for (s, k) in kinds.iter().enumerate() {
            for c in 0..k.len() as u64 {
                items.push((s, c));
            }
        }
        let mut extents: Vec<Vec<(usize, u64)>> = items.chunks(per_extent).map(|c| c.to_vec()).collect();
        shuffle(&mut extents, order | 1);
        let mut b = IndexBuilder::with_memory(&drives, false, ExtentKeys::Seq, true, 4096);
        for (seq, ext) in extents.iter().enumerate() {
            let key = b.add_extent(
                seq as u64,
                ArchiveOffset(1000 + seq as u64 * 200),
                150,
                [seq as u8; 32],
            ).unwrap();
            let mut items = ext.clone();
            shuffle(&mut items, order ^ seq as u64);
            for &(s, c) in &items {
                let d = &drives[s];
                match kinds[s][c as usize] {
                    Kind::Zero => b.add_entry(d.id, RunKind::Zero, c, 1, key).unwrap(),
                    Kind::Data(x) => {
                        b.add_entry(d.id, RunKind::Data, c, 1, key).unwrap();
                        let len = cluster_len(d.size, ClusterNo(c));
                        b.add_leaf(d.id, c, key, leaf(&cluster_bytes(s, c, x, len))).unwrap();
                    }
                }
            }
        }
        let built = b.finish(FinishOptions {
            lenient: false,
            source: None,
            keep_pages: true,
            uuid: [1; 16],
            progress: None,
        }).unwrap();
        // Drive digests against the naive digest of every byte.
        for (s, d) in drives.iter().enumerate() {
            let mut bytes = Vec::with_capacity(d.size as usize);
            for c in 0..d.clusters() {
                let len = cluster_len(d.size, ClusterNo(c));
                match kinds[s][c as usize] {
                    Kind::Zero => bytes.extend(std::iter::repeat_n(0u8, len)),
                    Kind::Data(x) => bytes.extend(cluster_bytes(s, c, x, len)),
                }
            }
            prop_assert_eq!(built.roots[s], Some(crate::tree::digest_of_bytes(&bytes)));
        }
        // Read everything back through the paged index.
        let layout = built.layout();
        let pages = Arc::new(built.pages.unwrap());
        let paged = PagedIndex::new(
            layout,
            built.directory,
            built.records,
            &drives,
            false,
            ExtentKeys::Seq,
            0..u64::MAX,
            PageSource::Built(pages),
            "test",
        ).unwrap();
        for (s, d) in drives.iter().enumerate() {
            let mut next = 0;
            for r in paged.runs_from(s, 0).unwrap() {
                let r = r.unwrap();
                prop_assert_eq!(r.start, next);
                for c in r.start..r.end() {
                    let k = kinds[s][c as usize];
                    prop_assert_eq!(r.kind == RunKind::Zero, k == Kind::Zero);
                    if let Kind::Data(x) = k {
                        let len = cluster_len(d.size, ClusterNo(c));
                        prop_assert_eq!(paged.leaf_of(s, c).unwrap(), leaf(&cluster_bytes(s, c, x, len)));
                        // The run names the extent that held the cluster.
                        let seq = extents.iter().position(|e| e.contains(&(s, c))).unwrap() as u64;
                        prop_assert_eq!(r.extent, ExtentRef::seq(seq));
                    }
                }
                next = r.end();
            }
            prop_assert_eq!(next, d.clusters());
        }
        paged.prove_digests().unwrap();
        let rec = paged.extent_record(ExtentRef::seq(0)).unwrap();
        prop_assert_eq!(rec.len, 150);
    }
}

fn one_drive(clusters: u64) -> Vec<DriveInfo> {
    vec![DriveInfo {
        id: DriveId(1),
        name: "d".into(),
        size: clusters * CLUSTER_SIZE as u64,
    }]
}

fn finish(b: IndexBuilder, lenient: bool) -> Result<BuiltIndex> {
    b.finish(FinishOptions {
        lenient,
        source: None,
        keep_pages: false,
        uuid: [1; 16],
        progress: None,
    })
}

/// A cluster held by two extents: the same bytes are a duplicate (the
/// first copy used), different bytes a conflict (zeros, reported); a
/// strict build refuses both.
#[test]
fn duplicates_and_conflicts() {
    let d = one_drive(4);
    let l = |x: u8| leaf(&[x; CLUSTER_SIZE]);
    let make = |second: u8| {
        let mut b = IndexBuilder::with_memory(&d, false, ExtentKeys::Seq, true, 4096);
        b.add_entry(DriveId(1), RunKind::Data, 0, 3, ExtentRef::seq(0))
            .unwrap();
        for c in 0..3 {
            b.add_leaf(DriveId(1), c, ExtentRef::seq(0), l(c as u8 + 1))
                .unwrap();
        }
        b.add_entry(DriveId(1), RunKind::Data, 1, 1, ExtentRef::seq(1))
            .unwrap();
        b.add_leaf(DriveId(1), 1, ExtentRef::seq(1), l(second))
            .unwrap();
        b.add_entry(DriveId(1), RunKind::Zero, 3, 1, ExtentRef::seq(1))
            .unwrap();
        b
    };
    let same = finish(make(2), true).unwrap();
    assert!(same.conflicting.is_empty());
    assert!(
        matches!(same.problems[..], [Error::Duplicate { .. }]),
        "{:?}",
        same.problems
    );
    assert!(same.roots[0].is_some());
    let differ = finish(make(9), true).unwrap();
    assert_eq!(differ.conflicting.len(), 1);
    assert_eq!(
        differ.conflicting[0].bytes,
        CLUSTER_SIZE as u64..2 * CLUSTER_SIZE as u64
    );
    assert!(
        matches!(differ.problems[..], [Error::Conflicting { .. }]),
        "{:?}",
        differ.problems
    );
    assert!(differ.roots[0].is_none());
    assert!(matches!(
        finish(make(2), false),
        Err(Error::Duplicate { .. })
    ));
}

/// Gaps are missing, unless a damaged extent claimed them.
#[test]
fn gaps_are_missing_or_damaged() {
    let d = one_drive(10);
    let mut b = IndexBuilder::with_memory(&d, false, ExtentKeys::Seq, true, 4096);
    b.add_entry(DriveId(1), RunKind::Zero, 0, 2, ExtentRef::seq(0))
        .unwrap();
    b.add_damaged(DriveId(1), 3, 2).unwrap();
    b.add_entry(DriveId(1), RunKind::Zero, 6, 4, ExtentRef::seq(2))
        .unwrap();
    let built = finish(b, true).unwrap();
    let cs = CLUSTER_SIZE as u64;
    assert_eq!(
        built
            .missing
            .iter()
            .map(|r| r.bytes.clone())
            .collect::<Vec<_>>(),
        vec![2 * cs..3 * cs, 5 * cs..6 * cs]
    );
    assert_eq!(built.damaged[0].bytes, 3 * cs..5 * cs);
    // Zero runs fill the lost ranges, so the index still covers the drive.
    assert_eq!(built.records[0].run_count, 1);
    let mut b = IndexBuilder::with_memory(&d, false, ExtentKeys::Seq, true, 4096);
    b.add_entry(DriveId(1), RunKind::Zero, 0, 2, ExtentRef::seq(0))
        .unwrap();
    assert!(matches!(finish(b, false), Err(Error::Incomplete { .. })));
}

//! Property tests: random drives, sizes, patterns and write orders written
//! and read back through every reader; corruption and truncation of the
//! results are always detected.

use std::io::Write;

use proptest::prelude::*;
use vma_core::format::{limits, CLUSTER_SIZE};
use vma_core::read::reader::Reader;
use vma_core::read::stream::{ArchiveStream, DriveDigestCheck, HashDrives, PassOptions};
use vma_core::types::{clusters_for, ClusterNo};
use vma_core::{ArchiveMeta, Compression, ConfigBlob, DriveId, DriveInfo, Writer, WriterOptions};

/// One cluster's content pattern.
#[derive(Clone, Debug)]
enum Pattern {
    Zero,
    Random(u64),
    /// A few non-zero 4 KiB blocks, the rest zero.
    Sparse(u16, u8),
}

fn fill(p: &Pattern, out: &mut [u8]) {
    match p {
        Pattern::Zero => out.fill(0),
        Pattern::Random(seed) => {
            let mut x = *seed | 1;
            for b in out.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        Pattern::Sparse(mask, v) => {
            out.fill(0);
            for (i, c) in out.chunks_mut(4096).enumerate() {
                if mask & (1 << i) != 0 {
                    c[i % c.len()] = *v | 1;
                    let last = c.len() - 1;
                    c[last] = v.wrapping_add(3) | 1;
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    sizes: Vec<u64>,
    patterns: Vec<Vec<Pattern>>,
    order_seed: u64,
    zero_runs: bool,
    compression: Compression,
    extent_payload: usize,
    threads: usize,
}

fn pattern() -> impl Strategy<Value = Pattern> {
    prop_oneof![
        2 => Just(Pattern::Zero),
        3 => any::<u64>().prop_map(Pattern::Random),
        2 => (any::<u16>(), any::<u8>()).prop_map(|(m, v)| Pattern::Sparse(m, v)),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..5)
        .prop_flat_map(|n| proptest::collection::vec(0u64..(40 * CLUSTER_SIZE as u64 + 12345), n))
        .prop_flat_map(|sizes| {
            let pats: Vec<_> = sizes
                .iter()
                .map(|&s| proptest::collection::vec(pattern(), clusters_for(s) as usize))
                .collect();
            (
                Just(sizes),
                pats,
                any::<u64>(),
                any::<bool>(),
                prop_oneof![
                    Just(Compression::None),
                    (-3i32..4).prop_map(Compression::Zstd)
                ],
                prop_oneof![Just(4096usize), Just(65536), Just(300_000), Just(1 << 20)],
                1usize..4,
            )
        })
        .prop_map(
            |(sizes, patterns, order_seed, zero_runs, compression, extent_payload, threads)| Case {
                sizes,
                patterns,
                order_seed,
                zero_runs,
                compression,
                extent_payload,
                threads,
            },
        )
}

/// The drives' expected contents.
fn images(case: &Case) -> Vec<Vec<u8>> {
    case.sizes
        .iter()
        .zip(&case.patterns)
        .map(|(&size, pats)| {
            let mut img = vec![0u8; size as usize];
            for (i, p) in pats.iter().enumerate() {
                let start = i * CLUSTER_SIZE;
                let end = (start + CLUSTER_SIZE).min(size as usize);
                fill(p, &mut img[start..end]);
            }
            img
        })
        .collect()
}

fn meta(case: &Case) -> ArchiveMeta {
    let drives = case
        .sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| DriveInfo {
            id: DriveId(i as u8 * 3 + 1),
            name: format!("drive-{i}"),
            size,
        })
        .collect();
    let mut m = ArchiveMeta::new(
        drives,
        vec![ConfigBlob {
            name: "qemu-server.conf".into(),
            data: b"cores: 2\n".to_vec(),
        }],
    );
    m.uuid = [0x42; 16];
    m.ctime = 1_700_000_000;
    m
}

/// Write the case's clusters (drives as in `m`) into `w` in a shuffled
/// order.
fn write_shuffled(case: &Case, m: &ArchiveMeta, w: &mut dyn vma_core::ClusterWriter) {
    let imgs = images(case);
    let mut work: Vec<(usize, u64)> = Vec::new();
    for (d, &size) in case.sizes.iter().enumerate() {
        for c in 0..clusters_for(size) {
            work.push((d, c));
        }
    }
    // Deterministic Fisher-Yates shuffle.
    let mut x = case.order_seed | 1;
    for i in (1..work.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        work.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for (d, c) in work {
        let id = m.drives[d].id;
        let start = c as usize * CLUSTER_SIZE;
        let end = (start + CLUSTER_SIZE).min(imgs[d].len());
        if case.zero_runs && matches!(case.patterns[d][c as usize], Pattern::Zero) {
            w.write_zeros(id, c..c + 1).unwrap();
        } else {
            w.write_cluster(id, ClusterNo(c), &imgs[d][start..end])
                .unwrap();
        }
    }
}

/// Write the case's clusters in a shuffled order; returns the archive.
fn write(case: &Case, threads: usize) -> Vec<u8> {
    let m = meta(case);
    let options = WriterOptions {
        compression: case.compression,
        threads,
        extent_payload: case.extent_payload,
    };
    let mut w = Writer::new(Vec::new(), m.clone(), &options).unwrap();
    write_shuffled(case, &m, &mut w);
    w.finish().unwrap().0
}

fn pass_contents(archive: &[u8], n: usize, sizes: &[u64]) -> (Vec<Vec<u8>>, vma_core::PassReport) {
    let stream = ArchiveStream::open(archive, "test").unwrap();
    let header = stream.header().clone();
    let mut out: Vec<Vec<u8>> = sizes.iter().map(|&s| vec![0xAA; s as usize]).collect();
    let options = PassOptions {
        threads: 2,
        keep_going: false,
        hash_drives: HashDrives::All,
        ..Default::default()
    };
    let report = stream
        .pass(&options, |ext| {
            for (drive, cluster, data) in ext.clusters() {
                let slot = header.drives.iter().position(|d| d.id == drive).unwrap();
                let start = cluster.byte_offset() as usize;
                let end = (start + CLUSTER_SIZE).min(out[slot].len());
                data.expand_into(&mut out[slot][start..end]);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(out.len(), n);
    // Zero runs are handed over too (as zero clusters).
    (out, report)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn round_trip_every_reader(case in case()) {
        let imgs = images(&case);
        let archive = write(&case, case.threads);

        // Sequential pass: exact bytes, clean report, no digests (out of order).
        let (got, report) = pass_contents(&archive, imgs.len(), &case.sizes);
        prop_assert!(report.is_clean(), "{:?}", report.problems);
        for (g, want) in got.iter().zip(&imgs) {
            prop_assert!(g == want);
        }

        // Random access through the index, at odd offsets and lengths.
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&archive).unwrap();
        let reader = Reader::open(f.path()).unwrap();
        for (d, want) in reader.header().drives.clone().iter().zip(&imgs) {
            let mut buf = vec![0u8; want.len()];
            reader.read_at(d.id, 0, &mut buf).unwrap();
            prop_assert!(&buf == want);
            let mut x = case.order_seed | 1;
            for _ in 0..8 {
                if want.is_empty() { break; }
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                let off = (x % want.len() as u64) as usize;
                let len = ((x >> 32) as usize % 200_000).min(want.len() - off);
                let mut b = vec![0u8; len];
                reader.read_at(d.id, off as u64, &mut b).unwrap();
                prop_assert!(b[..] == want[off..off + len]);
            }
            let mut over = vec![0u8; 1];
            prop_assert!(reader.read_at(d.id, want.len() as u64, &mut over).is_err());
        }

        // Output is independent of thread timing and count.
        let again = write(&case, 1);
        prop_assert!(again == archive, "output differs between thread counts");
    }

    #[test]
    fn every_bit_flip_is_detected(case in case(), pos_seed in any::<u64>(), bit in 0u8..8) {
        let archive = write(&case, 2);
        let pos = (pos_seed % archive.len() as u64) as usize;
        let mut bad = archive.clone();
        bad[pos] ^= 1 << bit;
        let detected = match ArchiveStream::open(&bad[..], "flipped") {
            Err(_) => true,
            Ok(stream) => {
                let options = PassOptions { threads: 2, keep_going: true, hash_drives: HashDrives::All, ..Default::default() };
                match stream.pass(&options, |_| Ok(())) {
                    Err(_) => true,
                    Ok(r) => !r.is_clean(),
                }
            }
        };
        prop_assert!(detected, "flip of bit {} at offset {} of {} went unnoticed", bit, pos, archive.len());
        // The random-access reader never returns wrong bytes: it fails to
        // open, or every drive reads back exactly or with an error.
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bad).unwrap();
        if let Ok(reader) = Reader::open(f.path()) {
            for (d, want) in reader.header().drives.clone().iter().zip(images(&case)) {
                let mut buf = vec![0u8; want.len()];
                if reader.read_at(d.id, 0, &mut buf).is_ok() {
                    prop_assert!(buf == want, "wrong bytes returned for drive {}", d.name);
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_detected(case in case(), cut_seed in any::<u64>()) {
        let archive = write(&case, 2);
        let cut = (cut_seed % archive.len() as u64) as usize;
        let short = &archive[..cut];
        let clean = match ArchiveStream::open(short, "short") {
            Err(_) => false,
            Ok(stream) => {
                let options = PassOptions { threads: 1, keep_going: true, hash_drives: HashDrives::None, ..Default::default() };
                stream.pass(&options, |_| Ok(())).map(|r| r.is_clean()).unwrap_or(false)
            }
        };
        prop_assert!(!clean, "truncation at {} of {} went unnoticed", cut, archive.len());
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(short).unwrap();
        prop_assert!(Reader::open(f.path()).is_err());
    }
}

/// One drive written in order.
fn in_order_archive(img: &[u8]) -> Vec<u8> {
    let drive = DriveInfo {
        id: DriveId(1),
        name: "d".into(),
        size: img.len() as u64,
    };
    let mut m = ArchiveMeta::new(vec![drive], vec![]);
    m.ctime = 0;
    let mut w = Writer::new(Vec::new(), m, &WriterOptions::default()).unwrap();
    for c in 0..clusters_for(img.len() as u64) {
        let s = c as usize * CLUSTER_SIZE;
        let e = (s + CLUSTER_SIZE).min(img.len());
        w.write_cluster(DriveId(1), ClusterNo(c), &img[s..e])
            .unwrap();
    }
    w.finish().unwrap().0
}

/// `archive` with the first drive record's digest replaced by `digest`,
/// the index digest, archive digest and footer recomputed: a forgery that
/// passes every checksum.
fn with_recorded_digest(archive: &[u8], digest: [u8; 32]) -> Vec<u8> {
    use vma_core::format::{
        archive_digest, index_digest, Footer, HeaderPrefix, IndexFixed, DRIVE_RECORD_LEN,
        FOOTER_LEN, INDEX_FIXED_LEN,
    };
    let mut b = archive.to_vec();
    let hlen = HeaderPrefix::decode(b[..64].try_into().unwrap())
        .unwrap()
        .header_len;
    let header_digest: [u8; 32] = b[hlen - 32..hlen].try_into().unwrap();
    let footer_at = b.len() - FOOTER_LEN;
    let mut footer = Footer::decode(b[footer_at..].try_into().unwrap(), footer_at as u64).unwrap();
    let at = footer.index_offset as usize;
    let fixed = IndexFixed::decode(b[at..at + INDEX_FIXED_LEN].try_into().unwrap(), 0).unwrap();
    let l = fixed.layout().unwrap();
    let rec = at + l.records_at as usize;
    b[rec + 48..rec + 80].copy_from_slice(&digest);
    let dir = at + l.directory_at as usize;
    let dig = at + l.digest_at as usize;
    let idx = index_digest(
        &b[at..at + INDEX_FIXED_LEN],
        &b[rec..rec + DRIVE_RECORD_LEN * fixed.drive_count as usize],
        &b[dir..dig],
    );
    b[dig..dig + 32].copy_from_slice(&idx);
    footer.archive_digest = archive_digest(&header_digest, &idx);
    b[footer_at..].copy_from_slice(&footer.encode());
    b
}

#[test]
fn in_order_writes_record_and_verify_drive_digests() {
    let size = 5 * CLUSTER_SIZE + 777;
    let mut img = vec![0u8; size];
    fill(
        &Pattern::Random(9),
        &mut img[CLUSTER_SIZE..3 * CLUSTER_SIZE],
    );
    img[size - 1] = 7;
    let digest = vma_core::tree::digest_of_bytes(&img);
    let verify = |archive: &[u8]| {
        vma_core::ops::verify::verify(ArchiveStream::open(archive, "a").unwrap(), 2, true, None)
            .unwrap()
    };
    let good = in_order_archive(&img);
    let report = verify(&good);
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.digests, vec![DriveDigestCheck::Match(digest)]);

    // A wrong recorded digest (with valid checksums) is reported.
    let forged = with_recorded_digest(&good, [1; 32]);
    let report = verify(&forged);
    assert!(!report.is_clean());
    assert!(
        report.problems[0].to_string().contains("drive digest"),
        "{}",
        report.problems[0]
    );

    // Extract checks the drive digest always; on a mismatch it leaves no
    // drive file behind.
    let extract = |archive: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        let options = vma_core::ops::extract::ExtractOptions {
            format: vma_core::ops::extract::DriveFormat::Raw,
            drives: vec![],
            force: false,
            threads: 2,
            salvage: false,
            check_drive_digests: false,
            progress: None,
        };
        let stream = ArchiveStream::open(archive, "a").unwrap();
        let result = vma_core::ops::extract::extract(stream, dir.path(), &options, None, |_| {});
        let out = std::fs::read(dir.path().join("d.raw")).ok();
        (result.map(|_| ()), out)
    };
    let (result, out) = extract(&good);
    result.unwrap();
    assert_eq!(out.as_deref(), Some(&img[..]));
    let (result, out) = extract(&forged);
    let err = result.unwrap_err().to_string();
    assert!(err.contains("drive digest") && err.contains('d'), "{err}");
    assert_eq!(out, None, "a drive with a wrong digest was committed");

    // A writer told what digest to expect refuses to finish otherwise.
    let drive = DriveInfo {
        id: DriveId(1),
        name: "d".into(),
        size: img.len() as u64,
    };
    let mut w = Writer::new(
        Vec::new(),
        ArchiveMeta::new(vec![drive], vec![]),
        &WriterOptions::default(),
    )
    .unwrap();
    for c in 0..clusters_for(img.len() as u64) {
        let s = c as usize * CLUSTER_SIZE;
        let e = (s + CLUSTER_SIZE).min(img.len());
        w.write_cluster(DriveId(1), ClusterNo(c), &img[s..e])
            .unwrap();
    }
    w.expect_drive_digest(DriveId(1), [2; 32]).unwrap();
    assert!(matches!(
        w.finish(),
        Err(vma_core::Error::DriveDigestMismatch { .. })
    ));
}

#[test]
fn writer_refuses_duplicates_gaps_and_bad_lengths() {
    let m = ArchiveMeta::new(
        vec![DriveInfo {
            id: DriveId(1),
            name: "d".into(),
            size: 3 * CLUSTER_SIZE as u64,
        }],
        vec![],
    );
    let new = || Writer::new(Vec::new(), m.clone(), &WriterOptions::default()).unwrap();
    let mut w = new();
    let c = vec![1u8; CLUSTER_SIZE];
    w.write_cluster(DriveId(1), ClusterNo(1), &c).unwrap();
    assert!(w.write_cluster(DriveId(1), ClusterNo(3), &c).is_err());
    assert!(w.write_cluster(DriveId(2), ClusterNo(0), &c).is_err());
    assert!(w
        .write_cluster(DriveId(1), ClusterNo(0), &c[..100])
        .is_err());
    let err = w.finish().unwrap_err().to_string();
    assert!(
        err.contains("never written") && err.contains("bytes 0..65536"),
        "{err}"
    );
    // Clusters given twice are found when the index is built.
    let mut w = new();
    w.write_cluster(DriveId(1), ClusterNo(1), &c).unwrap();
    w.write_cluster(DriveId(1), ClusterNo(1), &c).unwrap();
    w.write_zeros(DriveId(1), 0..3).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("twice"), "{err}");
}

#[test]
fn limits_are_enforced() {
    let drive = |i: usize| DriveInfo {
        id: DriveId(i as u8),
        name: format!("d{i}"),
        size: 4096,
    };
    // 255 drives work.
    let drives: Vec<_> = (1..=255).map(drive).collect();
    let mut w = Writer::new(
        Vec::new(),
        ArchiveMeta::new(drives, vec![]),
        &WriterOptions::default(),
    )
    .unwrap();
    for i in 1..=255u8 {
        w.write_zeros(DriveId(i), 0..1).unwrap();
    }
    let archive = w.finish().unwrap().0;
    let stream = ArchiveStream::open(&archive[..], "a").unwrap();
    assert_eq!(stream.header().drives.len(), 255);
    assert!(stream
        .pass(&PassOptions::default(), |_| Ok(()))
        .unwrap()
        .is_clean());

    // A 256th cannot even be given an id; 256 entries are refused.
    let mut drives: Vec<_> = (1..=255).map(drive).collect();
    drives.push(DriveInfo {
        id: DriveId(255),
        name: "extra".into(),
        size: 1,
    });
    assert!(Writer::new(
        Vec::new(),
        ArchiveMeta::new(drives, vec![]),
        &WriterOptions::default()
    )
    .is_err());

    let long = DriveInfo {
        id: DriveId(1),
        name: "n".repeat(limits::MAX_NAME_LEN + 1),
        size: 1,
    };
    assert!(Writer::new(
        Vec::new(),
        ArchiveMeta::new(vec![long], vec![]),
        &WriterOptions::default()
    )
    .is_err());

    let big = ConfigBlob {
        name: "big".into(),
        data: vec![0; limits::MAX_CONFIG_SIZE + 1],
    };
    let err = Writer::new(
        Vec::new(),
        ArchiveMeta::new(vec![drive(1)], vec![big]),
        &WriterOptions::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("16 MiB"), "{err}");
    let ok = ConfigBlob {
        name: "nvram".into(),
        data: vec![7; limits::MAX_CONFIG_SIZE],
    };
    assert!(Writer::new(
        Vec::new(),
        ArchiveMeta::new(vec![drive(1)], vec![ok]),
        &WriterOptions::default()
    )
    .is_ok());

    let many: Vec<_> = (0..5)
        .map(|i| ConfigBlob {
            name: format!("c{i}"),
            data: vec![0; limits::MAX_CONFIG_SIZE],
        })
        .collect();
    let err = Writer::new(
        Vec::new(),
        ArchiveMeta::new(vec![drive(1)], many),
        &WriterOptions::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("64 MiB"), "{err}");

    let huge = DriveInfo {
        id: DriveId(1),
        name: "h".into(),
        size: limits::MAX_DRIVE_SIZE + 1,
    };
    assert!(Writer::new(
        Vec::new(),
        ArchiveMeta::new(vec![huge], vec![]),
        &WriterOptions::default()
    )
    .is_err());
}

/// Write the case as VMA v1 (shuffled order, ids as in `meta`).
fn write_v1(case: &Case) -> Vec<u8> {
    use vma_core::write::v1::V1Writer;
    let m = meta(case);
    let mut w = V1Writer::new(Vec::new(), m.uuid, 7, m.drives.clone(), m.configs.clone()).unwrap();
    write_shuffled(case, &m, &mut w);
    w.finish().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    /// VMA v1: written in random order, read back exactly through the
    /// sequential pass and random access; v1 -> v2 -> v1 is byte-identical;
    /// any truncation is detected as missing clusters or a short extent.
    #[test]
    fn vma1_round_trip(case in case(), cut_seed in any::<u64>()) {
        use vma_core::ops::convert::{copy_extent, AnyWriter};
        let imgs = images(&case);
        let v1 = write_v1(&case);
        let stream = ArchiveStream::open(&v1[..], "v1").unwrap();
        prop_assert_eq!(stream.format(), vma_core::read::stream::ArchiveFormat::VmaV1);
        let (got, report) = pass_contents_v1(&v1, &case.sizes);
        prop_assert!(report.is_clean(), "{:?}", report.problems);
        for (g, want) in got.iter().zip(&imgs) {
            prop_assert!(g == want);
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&v1).unwrap();
        let reader = Reader::open(f.path()).unwrap();
        for (d, want) in reader.header().drives.clone().iter().zip(&imgs) {
            let mut buf = vec![0u8; want.len()];
            reader.read_at(d.id, 0, &mut buf).unwrap();
            prop_assert!(&buf == want);
        }

        // v1 -> v2 -> v1 through the convert machinery.
        let convert = |input: &[u8], to_v1: bool| -> Vec<u8> {
            let stream = ArchiveStream::open(input, "in").unwrap();
            let h = stream.header().clone();
            let meta = ArchiveMeta { uuid: h.uuid, ctime: h.ctime, creator: "t".into(), drives: h.drives.clone(), configs: h.configs.clone(), parent: None, stands_for: Vec::new() };
            let mut w = AnyWriter::new(Vec::new(), meta, to_v1, &WriterOptions::default()).unwrap();
            stream.pass(&PassOptions::default(), |ext| copy_extent(ext, &h.drives, &mut w)).unwrap();
            w.finish().unwrap().0
        };
        let v2 = convert(&v1, false);
        let back = convert(&v2, true);
        prop_assert!(back == v1, "v1 -> v2 -> v1 changed the bytes");

        // Truncation anywhere past the header is reported.
        let header_len = u32::from_be_bytes(v1[56..60].try_into().unwrap()) as usize;
        if v1.len() > header_len {
            let cut = header_len + (cut_seed % (v1.len() - header_len) as u64) as usize;
            let stream = ArchiveStream::open(&v1[..cut], "short").unwrap();
            let options = PassOptions { threads: 1, keep_going: true, hash_drives: HashDrives::None, ..Default::default() };
            let r = stream.pass(&options, |_| Ok(())).unwrap();
            prop_assert!(!r.is_clean(), "cut at {} of {} unnoticed", cut, v1.len());
        }
    }
}

fn pass_contents_v1(archive: &[u8], sizes: &[u64]) -> (Vec<Vec<u8>>, vma_core::PassReport) {
    let stream = ArchiveStream::open(archive, "v1").unwrap();
    let header = stream.header().clone();
    let mut out: Vec<Vec<u8>> = sizes.iter().map(|&s| vec![0xAA; s as usize]).collect();
    let report = stream
        .pass(
            &PassOptions {
                threads: 1,
                keep_going: false,
                hash_drives: HashDrives::None,
                ..Default::default()
            },
            |ext| {
                for (drive, cluster, data) in ext.clusters() {
                    let slot = header.drives.iter().position(|d| d.id == drive).unwrap();
                    let start = cluster.byte_offset() as usize;
                    let end = (start + CLUSTER_SIZE).min(out[slot].len());
                    data.expand_into(&mut out[slot][start..end]);
                }
                Ok(())
            },
        )
        .unwrap();
    (out, report)
}

/// Hand-built VMA v1 bytes for the format's pitfalls: unused slots with
/// device id 0 between used ones, a mask-0 (zero) cluster, a partial last
/// cluster, a device id of 254, and a blob buffer size that is not a
/// multiple of 512.
#[test]
fn vma1_pitfalls_by_hand() {
    use vma_core::format::v1::{Slot, V1ExtentHeader, V1Header};
    let uuid = [0x5a; 16];
    let header = V1Header {
        uuid,
        ctime: 1,
        drives: vec![DriveInfo {
            id: DriveId(254),
            name: "drive-virtio1".into(),
            size: CLUSTER_SIZE as u64 + 512,
        }],
        configs: vec![ConfigBlob {
            name: "qemu-server.conf".into(),
            data: b"x".to_vec(),
        }],
    };
    let mut bytes = header.encode().unwrap();
    assert_ne!(
        u32::from_be_bytes(bytes[52..56].try_into().unwrap()) % 512,
        0
    );
    // Slots: [unused, cluster 1 (one block), unused, cluster 0 (zero)].
    let ext = V1ExtentHeader {
        block_count: 1,
        slots: vec![
            Slot {
                mask: 0x0001,
                drive: DriveId(254),
                cluster: 1,
            },
            Slot {
                mask: 0,
                drive: DriveId(254),
                cluster: 0,
            },
        ],
    };
    let mut eh = ext.encode(&uuid);
    // Move the two used slots to positions 1 and 3 and re-seal the MD5.
    let s0: [u8; 8] = eh[40..48].try_into().unwrap();
    let s1: [u8; 8] = eh[48..56].try_into().unwrap();
    eh[40..72].fill(0);
    eh[48..56].copy_from_slice(&s0);
    eh[64..72].copy_from_slice(&s1);
    eh[24..40].fill(0);
    {
        use md5::{Digest, Md5};
        let d: [u8; 16] = Md5::digest(eh).into();
        eh[24..40].copy_from_slice(&d);
    }
    bytes.extend_from_slice(&eh);
    let mut block = vec![0u8; 4096];
    block[..512].fill(0x77); // drive bytes 65536..66048; the rest is padding
    bytes.extend_from_slice(&block);
    let (got, report) = pass_contents_v1(&bytes, &[CLUSTER_SIZE as u64 + 512]);
    assert!(report.is_clean(), "{:?}", report.problems);
    let mut want = vec![0u8; CLUSTER_SIZE + 512];
    want[CLUSTER_SIZE..].fill(0x77);
    assert_eq!(got[0], want);
    // The same archive missing its extent is incomplete, naming the drive.
    let header_only = &bytes[..bytes.len() - 512 - 4096];
    let stream = ArchiveStream::open(header_only, "h").unwrap();
    let err = stream
        .pass(&PassOptions::default(), |_| Ok(()))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("drive-virtio1 lacks 2 of its 2 clusters"),
        "{err}"
    );
}

#[test]
fn concurrent_readers_of_one_extent_share_one_decode() {
    let mut img = vec![0u8; 8 * CLUSTER_SIZE];
    fill(&Pattern::Random(3), &mut img);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&in_order_archive(&img)).unwrap();
    let reader = Reader::open(f.path()).unwrap();
    let key = reader
        .runs(DriveId(1))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .extent;
    let decoded: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| reader.extent(key).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(decoded
        .iter()
        .all(|d| std::sync::Arc::ptr_eq(d, &decoded[0])));
    assert!(reader
        .extents_to_prefetch(DriveId(1), 0..img.len() as u64)
        .iter()
        .all(|&k| k != key));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A diff against a full archive stores exactly the clusters that
    /// differ, and base + diff restore the new image.
    #[test]
    fn diff_stores_exactly_what_changed(
        clusters in 1u64..24,
        tail in 0u64..2,
        edits in proptest::collection::vec((any::<u64>(), 0u8..3), 0..12),
        base_pattern in proptest::collection::vec(0u8..3, 24),
    ) {
        use std::sync::Arc;
        use vma_core::chain::{Chain, ChainDrive};
        use vma_core::image::source::{copy_image, RawImage};
        let cs = CLUSTER_SIZE as u64;
        let size = clusters * cs - tail * 512;
        let dir = tempfile::tempdir().unwrap();
        // Base: per cluster zero, noise, or sparse.
        let mut old = vec![0u8; size as usize];
        for c in 0..clusters {
            let s = (c * cs) as usize;
            let e = ((c + 1) * cs).min(size) as usize;
            match base_pattern[c as usize] {
                0 => {}
                1 => fill(&Pattern::Random(c + 1), &mut old[s..e]),
                _ => old[s] = 1,
            }
        }
        let mut new = old.clone();
        for (at, kind) in &edits {
            let c = at % clusters;
            let s = (c * cs) as usize;
            let e = ((c + 1) * cs).min(size) as usize;
            match kind {
                0 => new[s..e].fill(0),
                1 => fill(&Pattern::Random(*at), &mut new[s..e]),
                _ => new[s] = new[s].wrapping_add(1),
            }
        }
        let (old_path, new_path) = (dir.path().join("old.raw"), dir.path().join("new.raw"));
        std::fs::write(&old_path, &old).unwrap();
        std::fs::write(&new_path, &new).unwrap();
        let drive = DriveInfo { id: DriveId(1), name: "d".into(), size };
        let full = dir.path().join("full.vma");
        let mut w = Writer::new(std::fs::File::create(&full).unwrap(), ArchiveMeta::new(vec![drive.clone()], vec![]), &WriterOptions::default()).unwrap();
        copy_image(&mut w, DriveId(1), &RawImage::open(&old_path).unwrap(), &mut |_| {}).unwrap();
        w.finish().unwrap();

        let chain = Arc::new(Chain::open(&full, &[]).unwrap());
        let reader = Reader::open(&full).unwrap();
        let mut meta = ArchiveMeta::new(vec![drive], vec![]);
        meta.parent = Some(reader.identity().unwrap());
        let diff = dir.path().join("diff.vma");
        let mut w = Writer::new(std::fs::File::create(&diff).unwrap(), meta, &WriterOptions::default()).unwrap();
        w.set_leaf_source(chain.leaf_source());
        let base = ChainDrive::new(chain, DriveId(1)).unwrap();
        let stats = vma_core::ops::diff::diff_image(&mut w, DriveId(1), &RawImage::open(&new_path).unwrap(), &base, &mut |_| {}).unwrap();
        w.finish().unwrap();

        let want: Vec<u64> = (0..clusters)
            .filter(|&c| {
                let s = (c * cs) as usize;
                let e = ((c + 1) * cs).min(size) as usize;
                old[s..e] != new[s..e]
            })
            .collect();
        let r = Reader::open(&diff).unwrap();
        let stored: Vec<u64> = r.runs(DriveId(1)).unwrap().map(Result::unwrap)
            .filter(|run| run.kind != vma_core::format::RunKind::Unchanged)
            .flat_map(|run| run.start..run.start + run.count as u64)
            .collect();
        prop_assert_eq!(&stored, &want);
        // The diff records the drive digest of the whole new image.
        prop_assert_eq!(r.drive_records()[0].digest, Some(vma_core::tree::digest_of_bytes(&new)));
        prop_assert_eq!(stats.changed, want.len() as u64);
        let chain = Chain::open(&diff, &[]).unwrap();
        let mut got = vec![0xEEu8; size as usize];
        chain.read_at(DriveId(1), 0, &mut got).unwrap();
        prop_assert!(got == new);
    }
}

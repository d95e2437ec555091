//! Hostile input: archives forged with valid digests (so they get past
//! every checksum) but lying about sizes, counts and offsets, decompression
//! bombs, index entries pointing outside the file or at the wrong extent,
//! and unsafe names. Every command must fail clearly (or succeed where the
//! lie is harmless), never panic, stay within bounded memory and time, and
//! never write outside its target directory; the random-access Reader must
//! return an error, never wrong bytes.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vma_core::format::{
    encode_entry, Codec, CompressionInfo, DriveRecord, Entry, ExtentHeader, Footer, Header, Index,
    IndexRun, RunKind, CLUSTER_SIZE,
};
use vma_core::{DriveId, DriveInfo, Reader};
use vma_tests::*;

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// A one-drive header (drive 1, `size` bytes, named `name`) with zstd allowed.
fn header(size: u64, name: &str) -> Vec<u8> {
    Header {
        version_minor: 0,
        incompat: vma_core::format::INCOMPAT_ZSTD,
        compat: 0,
        uuid: [7; 16],
        ctime: 1_700_000_000,
        compression: CompressionInfo {
            codec: Codec::Zstd,
            level: 1,
        },
        creator: "forged".into(),
        parent: None,
        stands_for: vec![],
        drives: vec![DriveInfo {
            id: DriveId(1),
            name: name.into(),
            size,
        }],
        configs: vec![],
    }
    .encode()
    .expect("valid header")
}

/// Re-seal a header block after its bytes were changed.
fn reseal_header(h: &mut [u8]) {
    let n = h.len();
    let d = sha(&h[..n - 32]);
    h[n - 32..].copy_from_slice(&d);
}

/// An extent with the given header fields, entries, masks and stored
/// payload, with a valid self-check and digest.
fn extent(h: ExtentHeader, entries: &[Entry], masks: &[u16], payload: &[u8]) -> Vec<u8> {
    let mut b = h.encode().to_vec();
    for e in entries {
        encode_entry(e, &mut b);
    }
    let start = b.len();
    for m in masks {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b.resize(start + (masks.len() * 2).next_multiple_of(8), 0);
    b.extend_from_slice(payload);
    let d = sha(&b);
    b.extend_from_slice(&d);
    b
}

/// A data extent holding `clusters` whole clusters of drive 1 from `start`,
/// every block stored, payload as given.
fn data_extent(
    seq: u64,
    start: u64,
    clusters: u32,
    codec: Codec,
    payload: &[u8],
    raw_len: u32,
) -> Vec<u8> {
    extent(
        ExtentHeader {
            seq,
            entry_count: 1,
            mask_count: clusters,
            codec,
            stored_len: payload.len() as u32,
            raw_len,
        },
        &[Entry {
            drive: DriveId(1),
            kind: RunKind::Data,
            count: clusters,
            start,
        }],
        &vec![0xffff; clusters as usize],
        payload,
    )
}

/// Header, extents, an index made from the extents' offsets, and the
/// footer, every digest valid.
fn assemble(
    header: Vec<u8>,
    extents: Vec<Vec<u8>>,
    index: impl FnOnce(&[u64]) -> Index,
) -> Vec<u8> {
    let mut file = header;
    let mut digest = Sha256::new();
    digest.update(&file[file.len() - 32..]);
    let mut offsets = Vec::new();
    for e in &extents {
        offsets.push(file.len() as u64);
        digest.update(&e[e.len() - 32..]);
        file.extend_from_slice(e);
    }
    let index_block = index(&offsets).encode();
    digest.update(&index_block[index_block.len() - 32..]);
    let index_offset = file.len() as u64;
    file.extend_from_slice(&index_block);
    let footer = Footer {
        index_offset,
        index_len: index_block.len() as u64,
        extent_count: extents.len() as u64,
        archive_digest: digest.finalize().into(),
    };
    file.extend_from_slice(&footer.encode());
    file
}

fn record(data_clusters: u64) -> Vec<DriveRecord> {
    vec![DriveRecord {
        drive: DriveId(1),
        data_clusters,
        stored_bytes: 0,
        digest: None,
        interrupted: false,
    }]
}

fn run(start: u64, count: u32, kind: RunKind, extent_offset: u64) -> IndexRun {
    IndexRun {
        drive: DriveId(1),
        start,
        count,
        kind,
        extent_offset,
    }
}

/// Peak RSS in KiB, exit code, output (stdout and stderr) and wall time
/// of `vma ARGS` run under a 4 GiB address-space limit.
fn bounded_vma(args: &str) -> (u64, i32, String, Duration) {
    let start = Instant::now();
    let o = sh(&format!(
        "ulimit -v 4194304; /usr/bin/time -f 'maxrss %M' \"$VMA\" {args}"
    ));
    let elapsed = start.elapsed();
    let err = format!("{}{}", stdout(&o), stderr(&o));
    let rss = err
        .lines()
        .filter_map(|l| l.strip_prefix("maxrss "))
        .next_back()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no maxrss from /usr/bin/time: {err}"));
    (rss, code(&o), err, elapsed)
}

/// Run every reading command on `bytes`: each exits with `want` (1 for
/// damage), says `expect` on stderr, stays under 256 MiB and 20 s, never
/// panics, and extraction writes nothing outside its directory (nor, on
/// failure, inside it).
fn judge(name: &str, bytes: &[u8], want: i32, expect: &str) {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("forged.vma");
    std::fs::write(&f, bytes).unwrap();
    let out = t.path().join("sub").join("out");
    for cmd in [
        format!("list {}", p(&f)),
        format!("verify {}", p(&f)),
        format!("extract {} {}", p(&f), p(&out)),
        format!("extract --salvage {} {}", p(&f), p(&out)),
        format!("verify - < {}", p(&f)),
    ] {
        let _ = std::fs::remove_dir_all(t.path().join("sub"));
        let (rss, status, err, took) = bounded_vma(&cmd);
        let salvage = cmd.contains("--salvage");
        assert!(
            !err.contains("panicked"),
            "{name}: vma {cmd} panicked: {err}"
        );
        assert!(rss < 256 * 1024, "{name}: vma {cmd} used {rss} KiB: {err}");
        assert!(
            took < Duration::from_secs(20),
            "{name}: vma {cmd} took {took:?}"
        );
        if cmd.starts_with("list") && want == 1 {
            // list shows the header and says the rest is unreadable.
            assert!(status == 0 || status == 1, "{name}: vma {cmd}: {err}");
            continue;
        }
        assert_eq!(status, want, "{name}: vma {cmd}: {err}");
        if want != 0 && !salvage {
            assert!(
                err.contains(expect),
                "{name}: vma {cmd} does not say {expect:?}: {err}"
            );
        }
        // Nothing outside the target directory, ever.
        let around: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "forged.vma" && n != "sub")
            .collect();
        assert!(around.is_empty(), "{name}: vma {cmd} wrote {around:?}");
        if t.path().join("sub").exists() {
            let inside: Vec<String> = std::fs::read_dir(t.path().join("sub"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert!(
                inside.iter().all(|n| n == "out"),
                "{name}: vma {cmd} wrote {inside:?}"
            );
            if want != 0 && !salvage && out.exists() {
                let files: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
                assert!(files.is_empty(), "{name}: failed vma {cmd} left {files:?}");
            }
        }
    }
}

/// Random-access reads of the whole drive either fail or return `expected`.
fn reader_never_lies(name: &str, bytes: &[u8], expected: &[u8]) {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("forged.vma");
    std::fs::write(&f, bytes).unwrap();
    let Ok(r) = Reader::open(&f) else {
        return;
    };
    let mut buf = vec![0u8; CLUSTER_SIZE];
    for (c, want) in expected.chunks(CLUSTER_SIZE).enumerate() {
        let got = &mut buf[..want.len()];
        if r.read_at(DriveId(1), (c * CLUSTER_SIZE) as u64, got)
            .is_ok()
        {
            assert!(got == want, "{name}: cluster {c} read back wrong bytes");
        }
    }
}

#[test]
fn decompression_bombs_are_stopped_at_the_declared_size() {
    // One block declared (4 KiB), a frame that expands to 64 MiB.
    let bomb = zstd::encode_all(&vec![0x41u8; 64 << 20][..], 19).unwrap();
    let e = extent(
        ExtentHeader {
            seq: 0,
            entry_count: 1,
            mask_count: 1,
            codec: Codec::Zstd,
            stored_len: bomb.len() as u32,
            raw_len: 4096,
        },
        &[Entry {
            drive: DriveId(1),
            kind: RunKind::Data,
            count: 1,
            start: 0,
        }],
        &[1],
        &bomb,
    );
    let file = assemble(header(CLUSTER_SIZE as u64, "disk"), vec![e], |off| Index {
        runs: vec![run(0, 1, RunKind::Data, off[0])],
        drives: record(1),
    });
    judge("4 KiB bomb", &file, 1, "damaged");
    reader_never_lies("4 KiB bomb", &file, &[0x41; CLUSTER_SIZE]);

    // The most an extent may declare (16 MiB), a frame of 1 GiB.
    let bomb = zstd::encode_all(std::io::repeat(0x42).take_exact(1 << 30), 19).unwrap();
    let clusters = 256u32;
    let e = data_extent(0, 0, clusters, Codec::Zstd, &bomb, 16 << 20);
    let size = clusters as u64 * CLUSTER_SIZE as u64;
    let file = assemble(header(size, "disk"), vec![e], |off| Index {
        runs: vec![run(0, clusters, RunKind::Data, off[0])],
        drives: record(clusters as u64),
    });
    judge("16 MiB bomb", &file, 1, "damaged");
}

/// `Read::take` with an exact length, for building big frames without
/// holding them.
trait TakeExact: std::io::Read + Sized {
    fn take_exact(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeExact for R {}

/// Two whole clusters of noise in two extents, and the index built by `runs`.
fn two_extents(runs: impl FnOnce(&[u64]) -> Vec<IndexRun>) -> (Vec<u8>, Vec<u8>) {
    let data = noise(77, 2 * CLUSTER_SIZE);
    let e0 = data_extent(
        0,
        0,
        1,
        Codec::None,
        &data[..CLUSTER_SIZE],
        CLUSTER_SIZE as u32,
    );
    let e1 = data_extent(
        1,
        1,
        1,
        Codec::None,
        &data[CLUSTER_SIZE..],
        CLUSTER_SIZE as u32,
    );
    let file = assemble(
        header(2 * CLUSTER_SIZE as u64, "disk"),
        vec![e0, e1],
        |off| Index {
            runs: runs(off),
            drives: record(2),
        },
    );
    (file, data)
}

#[test]
fn the_intact_forgery_base_reads_back() {
    // The builder itself makes valid archives (or the tests below prove nothing).
    let (file, data) = two_extents(|off| {
        vec![
            run(0, 1, RunKind::Data, off[0]),
            run(1, 1, RunKind::Data, off[1]),
        ]
    });
    judge("intact", &file, 0, "");
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("a.vma");
    std::fs::write(&f, &file).unwrap();
    let r = Reader::open(&f).unwrap();
    let mut buf = vec![0u8; data.len()];
    r.read_at(DriveId(1), 0, &mut buf).unwrap();
    assert!(buf == data);
}

/// Builds an index's runs from the extents' offsets.
type IndexFor = Box<dyn Fn(&[u64]) -> Vec<IndexRun>>;

#[test]
fn index_entries_pointing_elsewhere_are_refused_or_fail_reads() {
    let cases: Vec<(&str, IndexFor, &str)> = vec![
        (
            "run beyond the file",
            Box::new(|off| {
                vec![
                    run(0, 1, RunKind::Data, off[0]),
                    run(1, 1, RunKind::Data, 1 << 60),
                ]
            }),
            "outside the extents",
        ),
        (
            "runs pointing at each other's extents",
            Box::new(|off| {
                vec![
                    run(0, 1, RunKind::Data, off[1]),
                    run(1, 1, RunKind::Data, off[0]),
                ]
            }),
            "index disagrees",
        ),
        (
            "both runs at one extent",
            Box::new(|off| vec![run(0, 2, RunKind::Data, off[0])]),
            "index disagrees",
        ),
        (
            "run into the middle of an extent",
            Box::new(|off| {
                vec![
                    run(0, 1, RunKind::Data, off[0]),
                    run(1, 1, RunKind::Data, off[1] + 100),
                ]
            }),
            "index disagrees",
        ),
        (
            "overlapping runs",
            Box::new(|off| {
                vec![
                    run(0, 2, RunKind::Data, off[0]),
                    run(1, 1, RunKind::Data, off[1]),
                ]
            }),
            "overlaps",
        ),
        (
            "run past the drive's end",
            Box::new(|off| {
                vec![
                    run(0, 1, RunKind::Data, off[0]),
                    run(1, u32::MAX, RunKind::Data, off[1]),
                ]
            }),
            "beyond",
        ),
        (
            "run past this drive's end",
            Box::new(|off| {
                vec![
                    run(0, 1, RunKind::Data, off[0]),
                    run(1, 5, RunKind::Data, off[1]),
                ]
            }),
            "past its end",
        ),
        (
            "start near u64::MAX",
            Box::new(|off| {
                vec![
                    run(0, 1, RunKind::Data, off[0]),
                    run(1, 1, RunKind::Data, off[1]),
                    run(u64::MAX - 1, 5, RunKind::Zero, 0),
                ]
            }),
            "index",
        ),
    ];
    for (name, runs, expect) in cases {
        let (file, data) = two_extents(runs);
        // The sequential pass rebuilds the index from the extents: every
        // forgery is caught there; the seekable reader refuses or fails reads.
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("forged.vma");
        std::fs::write(&f, &file).unwrap();
        let (_, status, err, _) = bounded_vma(&format!("verify {}", p(&f)));
        assert_eq!(status, 1, "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        // What the seekable reader says, where it refuses the index.
        let seekable = match Reader::open(&f) {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        let said = format!("{err} {}", seekable.as_deref().unwrap_or(""));
        assert!(said.contains(expect), "{name}: {expect:?} not said: {said}");
        let (_, status, err, _) = bounded_vma(&format!("list {}", p(&f)));
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(status <= 1, "{name}: {err}");
        reader_never_lies(name, &file, &data);
    }
}

#[test]
fn entries_with_overflowing_cluster_numbers_are_refused() {
    let data = noise(5, CLUSTER_SIZE);
    for start in [u64::MAX, u64::MAX - 3, 1 << 40] {
        let e = data_extent(0, start, 1, Codec::None, &data, CLUSTER_SIZE as u32);
        let z = extent(
            ExtentHeader {
                seq: 1,
                entry_count: 1,
                mask_count: 0,
                codec: Codec::None,
                stored_len: 0,
                raw_len: 0,
            },
            &[Entry {
                drive: DriveId(1),
                kind: RunKind::Zero,
                count: u32::MAX,
                start: u64::MAX - 10,
            }],
            &[],
            &[],
        );
        let file = assemble(header(CLUSTER_SIZE as u64, "disk"), vec![e, z], |off| {
            Index {
                runs: vec![run(0, 1, RunKind::Data, off[0])],
                drives: record(1),
            }
        });
        judge(&format!("entry at cluster {start}"), &file, 1, "beyond");
    }
}

#[test]
fn huge_declared_counts_and_lengths_are_refused_without_allocating_them() {
    let (good, _) = two_extents(|off| {
        vec![
            run(0, 1, RunKind::Data, off[0]),
            run(1, 1, RunKind::Data, off[1]),
        ]
    });
    let index_at = good.windows(8).position(|w| w == b"VMA2IDX\0").unwrap();
    let footer_at = good.len() - 80;

    // Index run count of u64::MAX (index digest resealed).
    let mut f = good.clone();
    f[index_at + 8..index_at + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    let idx_end = footer_at;
    let d = sha(&f[index_at..idx_end - 32]);
    f[idx_end - 32..idx_end].copy_from_slice(&d);
    judge("index run count u64::MAX", &f, 1, "index");

    // Footer claiming an index of 2^62 bytes at offset 0 (self-check resealed).
    let mut f = good.clone();
    let mut footer = [0u8; 80];
    footer.copy_from_slice(&f[footer_at..]);
    footer[8..16].copy_from_slice(&0u64.to_le_bytes());
    footer[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let check = sha(&footer[..72]);
    footer[72..].copy_from_slice(&check[..8]);
    f[footer_at..].copy_from_slice(&footer);
    judge("footer index length 2^62", &f, 1, "footer");

    // Header length of 64 MiB in a file of a few hundred bytes.
    let mut f = good.clone();
    f[12..16].copy_from_slice(&(64u32 << 20).to_le_bytes());
    judge("header length 64 MiB, file short", &f, 1, "truncated");

    // Extent claiming 65 536 entries and 16 MiB of payload in a short file.
    let mut f = good[..index_at].to_vec();
    let h = ExtentHeader {
        seq: 2,
        entry_count: 65_536,
        mask_count: 256,
        codec: Codec::Zstd,
        stored_len: (16 << 20) + (64 << 10),
        raw_len: 16 << 20,
    };
    f.extend_from_slice(&h.encode());
    f.extend_from_slice(&[0u8; 100]);
    judge("extent claiming 16 MiB, file ends", &f, 1, "ends");
}

#[test]
fn drive_sizes_and_names_that_lie_are_refused() {
    // A drive larger than the format allows (header resealed).
    let mut h = header(CLUSTER_SIZE as u64, "disk");
    let pos = h.len() - 32 - 4 - 8; // the size field of the only drive
    h[pos..pos + 8].copy_from_slice(&((1u64 << 47) + 1).to_le_bytes());
    reseal_header(&mut h);
    let file = assemble(h, vec![], |_| Index {
        runs: vec![run(0, 1, RunKind::Zero, 0)],
        drives: record(0),
    });
    judge("drive size above 2^47", &file, 1, "at most");

    // Names that would escape or confuse: same length as "disk", resealed.
    for bad in ["../x", "a/bc", "x\0yz", "\x1b[1m", "\\etc", ".."] {
        let mut h = header(CLUSTER_SIZE as u64, &"d".repeat(bad.len()));
        let end = h.len() - 32;
        h[end - bad.len()..end].copy_from_slice(bad.as_bytes());
        reseal_header(&mut h);
        let file = assemble(h, vec![], |_| Index {
            runs: vec![run(0, 1, RunKind::Zero, 0)],
            drives: record(0),
        });
        judge(&format!("drive name {bad:?}"), &file, 1, "name");
    }
}

#[test]
fn hostile_qcow2_inputs_are_refused_clearly() {
    require("qemu-img");
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = |name: &str| d.join(name);
    // A backing chain that loops back on itself.
    let o = sh(&format!(
        "cd {} && qemu-img create -q -f qcow2 b.qcow2 64M && \
         qemu-img create -q -f qcow2 -F qcow2 -b b.qcow2 a.qcow2 && \
         qemu-img rebase -q -u -F qcow2 -b a.qcow2 b.qcow2 && \
         qemu-img create -q -f qcow2 base.qcow2 64M",
        p(d)
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let base = std::fs::read(img("base.qcow2")).unwrap();
    let patched = |name: &str, at: usize, value: &[u8]| {
        let mut b = base.clone();
        b[at..at + value.len()].copy_from_slice(value);
        std::fs::write(img(name), b).unwrap();
    };
    patched("l1-size.qcow2", 36, &0x7fff_ffffu32.to_be_bytes());
    patched("size.qcow2", 24, &(1u64 << 62).to_be_bytes());
    patched("l1-offset.qcow2", 40, &(1u64 << 62).to_be_bytes());
    patched("cluster-bits.qcow2", 20, &40u32.to_be_bytes());
    patched("refcount-order.qcow2", 96, &9u32.to_be_bytes());
    for (name, expect) in [
        ("a.qcow2", "loop"),
        ("l1-size.qcow2", "L1 table"),
        ("size.qcow2", "L1 table"),
        ("l1-offset.qcow2", "beyond the end of the file"),
        ("cluster-bits.qcow2", "cluster"),
        ("refcount-order.qcow2", "refcount"),
    ] {
        let archive = d.join(format!("{name}.vma"));
        let (rss, status, err, took) =
            bounded_vma(&format!("create -q {} {}", p(&archive), p(&img(name))));
        assert_eq!(status, 2, "{name}: {err}");
        assert!(err.contains(expect), "{name}: {expect:?} not said: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(
            rss < 256 * 1024 && took < Duration::from_secs(20),
            "{name}: {rss} KiB, {took:?}"
        );
        assert!(!archive.exists(), "{name}: an archive was left behind");
    }
}

//! Hostile input: archives forged with valid digests (so they get past
//! every checksum) but lying about sizes, counts and offsets, decompression
//! bombs, index entries pointing outside the file or at the wrong extent,
//! and unsafe names. Every command must fail clearly (or succeed where the
//! lie is harmless), never panic, stay within bounded memory and time, and
//! never write outside its target directory; the random-access Reader must
//! return an error, never wrong bytes.

use std::time::{Duration, Instant};

use vma_core::format::{
    Codec, Entry, ExtentHeader, ExtentRecord, Footer, Header, IndexFixed, IndexRun, RunKind,
    CLUSTER_SIZE, EXTENT_RECORD_LEN, FOOTER_LEN, INDEX_FIXED_LEN,
};
use vma_core::types::{ArchiveOffset, ExtentRef};
use vma_core::{DriveId, Reader};
use vma_tests::forge::{self, Archive};
use vma_tests::*;

const UUID: [u8; 16] = [7; 16];

/// A one-drive header (drive 1, `size` bytes, named `name`) with zstd allowed.
fn header(size: u64, name: &str) -> Header {
    forge::header(size, name, UUID)
}

/// An extent of this archive with the given fields, entries, masks and
/// stored payload, with a valid self-check and digest.
fn extent(
    seq: u64,
    entries: &[Entry],
    masks: &[u16],
    codec: Codec,
    payload: &[u8],
    raw_len: u32,
) -> Vec<u8> {
    forge::extent(
        ExtentHeader {
            uuid: UUID,
            seq,
            entry_count: entries.len() as u32,
            mask_count: masks.len() as u32,
            stored_len: payload.len() as u32,
            raw_len,
            codec,
        },
        entries,
        masks,
        payload,
    )
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
        seq,
        &[Entry {
            drive: DriveId(1),
            kind: RunKind::Data,
            count: clusters,
            start,
        }],
        &vec![0xffff; clusters as usize],
        codec,
        payload,
        raw_len,
    )
}

/// Header, extents, the index `forge` makes of the honest one (given the
/// extent table as the extents are placed), and the footer, every digest
/// valid. Without leaves in the honest index (extents that do not decode),
/// zeros stand for them.
fn assemble(header: Header, extents: Vec<Vec<u8>>, forge: impl FnOnce(&mut Archive)) -> Vec<u8> {
    let mut a = Archive {
        header,
        extents,
        runs: Vec::new(),
        table: None,
        leaves: Vec::new(),
        records: vec![vma_core::format::DriveRecord::empty(DriveId(1))],
    };
    forge(&mut a);
    a.bytes()
}

fn run(start: u64, count: u32, kind: RunKind, extent: u64) -> IndexRun {
    IndexRun {
        drive: DriveId(1),
        start,
        count,
        kind,
        // The run's on-disk field, forged as given (a 3.0 sequence number).
        extent: ExtentRef::from_raw(extent),
    }
}

/// Index parts for `runs` over a drive of `data_clusters` data clusters:
/// the runs as given, leaves of zeros, a drive digest of zeros.
fn lie(a: &mut Archive, runs: Vec<IndexRun>) {
    let data: u64 = runs
        .iter()
        .filter(|r| r.kind == RunKind::Data)
        .map(|r| r.count as u64)
        .sum();
    a.records = vec![vma_core::format::DriveRecord {
        data_clusters: data,
        run_count: runs.len() as u64,
        digest: Some([0; 32]),
        ..vma_core::format::DriveRecord::empty(DriveId(1))
    }];
    let clusters: u64 = a.header.drives.iter().map(|d| d.clusters()).sum();
    a.leaves = vec![[0; 32]; data.min(clusters) as usize];
    a.runs = runs;
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
        0,
        &[Entry {
            drive: DriveId(1),
            kind: RunKind::Data,
            count: 1,
            start: 0,
        }],
        &[1],
        Codec::Zstd,
        &bomb,
        4096,
    );
    let file = assemble(header(CLUSTER_SIZE as u64, "disk"), vec![e], |a| {
        lie(a, vec![run(0, 1, RunKind::Data, 0)])
    });
    judge("4 KiB bomb", &file, 1, "damaged");
    reader_never_lies("4 KiB bomb", &file, &[0x41; CLUSTER_SIZE]);

    // The most an extent may declare (16 MiB), a frame of 1 GiB.
    let bomb = zstd::encode_all(std::io::repeat(0x42).take_exact(1 << 30), 19).unwrap();
    let clusters = 256u32;
    let e = data_extent(0, 0, clusters, Codec::Zstd, &bomb, 16 << 20);
    let size = clusters as u64 * CLUSTER_SIZE as u64;
    let file = assemble(header(size, "disk"), vec![e], |a| {
        lie(a, vec![run(0, clusters, RunKind::Data, 0)])
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

/// Two whole clusters of noise in two extents, the honest index, then
/// `forge` applied to it.
fn two_extents(forge: impl FnOnce(&mut Archive)) -> (Vec<u8>, Vec<u8>) {
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
    let file = assemble(header(2 * CLUSTER_SIZE as u64, "disk"), vec![e0, e1], |a| {
        a.reindex();
        forge(a);
    });
    (file, data)
}

#[test]
fn the_intact_forgery_base_reads_back() {
    // The builder itself makes valid archives (or the tests below prove nothing).
    let (file, data) = two_extents(|_| {});
    judge("intact", &file, 0, "");
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("a.vma");
    std::fs::write(&f, &file).unwrap();
    let r = Reader::open(&f).unwrap();
    let mut buf = vec![0u8; data.len()];
    r.read_at(DriveId(1), 0, &mut buf).unwrap();
    assert!(buf == data);
}

/// Changes an honest index into a lying one.
type Forgery = Box<dyn Fn(&mut Archive)>;

#[test]
fn index_entries_pointing_elsewhere_are_refused_or_fail_reads() {
    let set_runs = |runs: Vec<IndexRun>| -> Forgery { Box::new(move |a| lie(a, runs.clone())) };
    let cases: Vec<(&str, Forgery, &str)> = vec![
        (
            "run naming an extent that does not exist",
            set_runs(vec![
                run(0, 1, RunKind::Data, 0),
                run(1, 1, RunKind::Data, 1 << 60),
            ]),
            "does not exist",
        ),
        (
            "runs pointing at each other's extents",
            set_runs(vec![
                run(0, 1, RunKind::Data, 1),
                run(1, 1, RunKind::Data, 0),
            ]),
            "index disagrees",
        ),
        (
            "both runs at one extent",
            set_runs(vec![run(0, 2, RunKind::Data, 0)]),
            "index disagrees",
        ),
        (
            "extent table pointing into the middle of an extent",
            Box::new(|a: &mut Archive| {
                let mut t = a.placed_table();
                t[1] = ExtentRecord {
                    offset: t[1].offset + 100,
                    ..t[1]
                };
                a.table = Some(t);
            }),
            "index disagrees",
        ),
        (
            "extent table naming the other extent's digest",
            Box::new(|a: &mut Archive| {
                let mut t = a.placed_table();
                t[1].digest = t[0].digest;
                a.table = Some(t);
            }),
            "index disagrees",
        ),
        (
            "overlapping runs",
            set_runs(vec![
                run(0, 2, RunKind::Data, 0),
                run(1, 1, RunKind::Data, 1),
            ]),
            "index",
        ),
        (
            "run past the drive's end",
            set_runs(vec![
                run(0, 1, RunKind::Data, 0),
                run(1, u32::MAX, RunKind::Data, 1),
            ]),
            "cannot cover",
        ),
        (
            "run past this drive's end",
            set_runs(vec![
                run(0, 1, RunKind::Data, 0),
                run(1, 5, RunKind::Data, 1),
            ]),
            "index",
        ),
        (
            "start near u64::MAX",
            set_runs(vec![
                run(0, 1, RunKind::Data, 0),
                run(1, 1, RunKind::Data, 1),
                run(u64::MAX - 1, 5, RunKind::Zero, 0),
            ]),
            "index",
        ),
    ];
    for (name, forgery, expect) in cases {
        let (file, data) = two_extents(|a| forgery(a));
        // The sequential pass rebuilds the index from the extents: every
        // forgery is caught there; the seekable reader refuses or fails reads.
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("forged.vma");
        std::fs::write(&f, &file).unwrap();
        let (_, status, err, _) = bounded_vma(&format!("verify {}", p(&f)));
        assert_eq!(status, 1, "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        // What the seekable reader says, where it refuses the index or a read.
        let seekable = match Reader::open(&f) {
            Ok(r) => {
                let mut buf = vec![0u8; data.len()];
                r.read_at(DriveId(1), 0, &mut buf)
                    .err()
                    .map(|e| e.to_string())
            }
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

/// An extent table record pointing outside the extents is named at the
/// record's own absolute offset in the file (once "offset 1": the extent's
/// sequence number stood in for its file offset).
#[test]
fn an_extent_record_outside_the_extents_is_named_at_its_absolute_offset() {
    let (file, _) = two_extents(|a| {
        let mut t = a.placed_table();
        t[1] = ExtentRecord {
            offset: ArchiveOffset(1 << 40),
            ..t[1]
        };
        a.table = Some(t);
    });
    let footer_at = file.len() - FOOTER_LEN;
    let footer = Footer::decode(file[footer_at..].try_into().unwrap(), footer_at as u64).unwrap();
    let at = footer.index_offset as usize;
    let fixed = IndexFixed::decode(
        file[at..at + INDEX_FIXED_LEN].try_into().unwrap(),
        at as u64,
    )
    .unwrap();
    let record_at = at as u64 + fixed.layout().unwrap().extents_at + EXTENT_RECORD_LEN as u64;
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("forged.vma");
    std::fs::write(&f, &file).unwrap();
    let err = match Reader::open(&f) {
        Ok(r) => {
            let mut buf = vec![0u8; 2 * CLUSTER_SIZE];
            r.read_at(DriveId(1), 0, &mut buf).unwrap_err()
        }
        Err(e) => e,
    }
    .to_string();
    assert!(
        err.contains(&format!("extent #1 at offset {record_at} is damaged"))
            && err.contains("index: extent #1 is recorded at 1099511627776+"),
        "{err}"
    );
}

#[test]
fn entries_with_overflowing_cluster_numbers_are_refused() {
    let data = noise(5, CLUSTER_SIZE);
    for start in [u64::MAX, u64::MAX - 3, 1 << 40] {
        let e = data_extent(0, start, 1, Codec::None, &data, CLUSTER_SIZE as u32);
        let z = extent(
            1,
            &[Entry {
                drive: DriveId(1),
                kind: RunKind::Zero,
                count: u32::MAX,
                start: u64::MAX - 10,
            }],
            &[],
            Codec::None,
            &[],
            0,
        );
        let file = assemble(header(CLUSTER_SIZE as u64, "disk"), vec![e, z], |a| {
            lie(a, vec![run(0, 1, RunKind::Data, 0)])
        });
        judge(&format!("entry at cluster {start}"), &file, 1, "beyond");
    }
}

#[test]
fn huge_declared_counts_and_lengths_are_refused_without_allocating_them() {
    let (good, _) = two_extents(|_| {});
    let index_at = good.windows(8).rposition(|w| w == b"VMA3IDX\0").unwrap();
    let footer_at = good.len() - 80;

    // Index run count of u64::MAX (the index's self-check resealed).
    let mut f = good.clone();
    f[index_at + 24..index_at + 32].copy_from_slice(&u64::MAX.to_le_bytes());
    let check = forge::sha(&f[index_at..index_at + 56]);
    f[index_at + 56..index_at + 64].copy_from_slice(&check[..8]);
    judge("index run count u64::MAX", &f, 1, "index");

    // Footer claiming an index of 2^62 bytes at offset 0 (self-check resealed).
    let mut f = good.clone();
    let mut footer = [0u8; 80];
    footer.copy_from_slice(&f[footer_at..]);
    footer[8..16].copy_from_slice(&0u64.to_le_bytes());
    footer[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let check = forge::sha(&footer[..72]);
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
        uuid: UUID,
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
    let h = header(CLUSTER_SIZE as u64, "disk");
    let mut b = h.encode().unwrap();
    let pos = b.len() - 32 - 4 - 8; // the size field of the only drive
    b[pos..pos + 8].copy_from_slice(&((1u64 << 47) + 1).to_le_bytes());
    forge::reseal_header(&mut b);
    let file = splice_header(&b, &zero_drive(h));
    judge("drive size above 2^47", &file, 1, "at most");

    // Names that would escape or confuse: same length as "disk", resealed.
    for bad in ["../x", "a/bc", "x\0yz", "\x1b[1m", "\\etc", ".."] {
        let h = header(CLUSTER_SIZE as u64, &"d".repeat(bad.len()));
        let mut b = h.encode().unwrap();
        let end = b.len() - 32;
        b[end - bad.len()..end].copy_from_slice(bad.as_bytes());
        forge::reseal_header(&mut b);
        let file = splice_header(&b, &zero_drive(h));
        judge(&format!("drive name {bad:?}"), &file, 1, "name");
    }
}

/// A valid archive of `h`'s one drive, all zero.
fn zero_drive(h: Header) -> Vec<u8> {
    assemble(h, vec![], |a| {
        a.runs = vec![run(0, 1, RunKind::Zero, 0)];
        a.records = vec![vma_core::format::DriveRecord {
            run_count: 1,
            digest: Some([0; 32]),
            ..vma_core::format::DriveRecord::empty(DriveId(1))
        }];
    })
}

/// `file` with its header replaced by `header` (of the same length).
fn splice_header(header: &[u8], file: &[u8]) -> Vec<u8> {
    let mut f = file.to_vec();
    f[..header.len()].copy_from_slice(header);
    f
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

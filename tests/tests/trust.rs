//! Regression tests for the findings that led to format 3.0 (issue 14):
//! the storage splicing, rolling back or overwriting an archive, a forged
//! or damaged parent, merge and prune laundering damage, salvage taking
//! foreign bytes or stopping at stray magic, two intact copies of one
//! cluster, and resources that grew with what an archive declares.
//! Every forgery here has valid digests (recomputed by `forge`), so only
//! the checks that bind bytes to their archive, place and content can
//! catch it. Each test says what 2.0 did with the same input.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vma_core::format::{ExtentRecord, CLUSTER_SIZE};
use vma_tests::forge::{Archive, ExtentParts};
use vma_tests::*;

const CS: usize = CLUSTER_SIZE;

/// `vma ARGS`, which must exit 0; its stdout.
fn ok(args: &[&str]) -> String {
    let o = vma(args);
    assert_eq!(code(&o), 0, "vma {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// An uncompressed archive of one drive "disk" holding `data` (so that two
/// archives of data of the same size have the same layout).
fn archive_of(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let img = dir.join(format!("{name}.img"));
    std::fs::write(&img, data).unwrap();
    let archive = dir.join(format!("{name}.vma"));
    ok(&[
        "create",
        "-q",
        "--compress",
        "none",
        p(&archive),
        &format!("disk={}", p(&img)),
    ]);
    archive
}

/// Read `len` bytes at `offset` of a file, or the error.
fn pread(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Splice: the storage put another archive's extent (same layout, same
/// place) into this one. 2.0: `verify` failed, but `mount` served the mix
/// of both archives with no error.
#[test]
fn a_spliced_archive_never_serves_the_other_archives_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (a_data, b_data) = (noise(1, 64 * CS), noise(2, 64 * CS));
    let a = archive_of(t.path(), "a", &a_data);
    let b = archive_of(t.path(), "b", &b_data);
    let (mut bytes, other) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(bytes.len(), other.len(), "same layout");
    let table = Archive::parse(&bytes).placed_table();
    let e = table[3];
    let range = e.offset.get() as usize..(e.offset.get() + e.len as u64) as usize;
    bytes[range.clone()].copy_from_slice(&other[range]);
    let spliced = t.path().join("spliced.vma");
    std::fs::write(&spliced, &bytes).unwrap();

    let o = vma(&["verify", p(&spliced)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("another archive"), "{}", stdout(&o));

    let m = Mounted::new(&spliced, &t.path().join("mnt"), &[]);
    let file = m.path("disk.raw");
    let mut errors = 0;
    for c in 0..64 {
        match pread(&file, (c * CS) as u64, CS) {
            Ok(got) => assert!(
                got == a_data[c * CS..(c + 1) * CS],
                "cluster {c}: the mount served bytes that are not the archive's"
            ),
            Err(_) => errors += 1,
        }
    }
    assert!(errors > 0, "the spliced extent was served without an error");
    m.unmount();
}

/// An archive overwritten in place while mounted (a backup job rewriting
/// the same file name). 2.0: the mount served a mix of both versions.
#[test]
fn an_archive_overwritten_under_a_mount_never_mixes_versions() {
    let t = tempfile::tempdir().unwrap();
    let (a_data, b_data) = (noise(3, 96 * CS), noise(4, 96 * CS));
    let a = archive_of(t.path(), "a", &a_data);
    let b = archive_of(t.path(), "b", &b_data);
    let m = Mounted::new(&a, &t.path().join("mnt"), &["--cache-size", "1"]);
    let file = m.path("disk.raw");
    // Read the first part (its index pages are now cached), then the file
    // is overwritten in place by the other archive.
    assert!(pread(&file, 0, 8 * CS).unwrap() == a_data[..8 * CS]);
    let new = std::fs::read(&b).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .write_all_at(&new, 0)
        .unwrap();
    let mut errors = 0;
    for c in 8..96 {
        match pread(&file, (c * CS) as u64, CS) {
            Ok(got) => assert!(
                got == a_data[c * CS..(c + 1) * CS],
                "cluster {c}: the mount served bytes of the archive written over it"
            ),
            Err(_) => errors += 1,
        }
    }
    assert!(
        errors > 0,
        "the overwritten archive was served without an error"
    );
    m.unmount();
}

/// A full, and an incremental on top of it changing the first clusters.
fn chain_of(dir: &Path, base: &[u8], changed: &[u8]) -> (PathBuf, PathBuf) {
    let full = archive_of(dir, "full", base);
    let img = dir.join("inc.img");
    std::fs::write(&img, changed).unwrap();
    let inc = dir.join("inc.vma");
    ok(&[
        "diff",
        "-q",
        "--compress",
        "none",
        "--against",
        p(&full),
        &format!("disk={}", p(&img)),
        "-o",
        p(&inc),
    ]);
    (full, inc)
}

/// `archive`'s extents framed again with `uuid`, indexed honestly.
fn with_uuid(archive: &Archive, uuid: [u8; 16]) -> Archive {
    let mut a = archive.clone();
    a.header.uuid = uuid;
    a.extents = a
        .extents
        .iter()
        .map(|e| {
            let parts = ExtentParts::parse(e);
            parts.frame(uuid, parts.header.seq)
        })
        .collect();
    a.reindex();
    a
}

/// A parent forged with the child's parent uuid (and, where a field could
/// hold it, the child's parent digest written in), and a stand-in forged
/// to claim the parent's point in time (its drive digests, state digest
/// and leaf pages copied from the real parent) over other data. 2.0:
/// `extract` of the child took the forged parent (uuid and the digest in
/// its footer matched) and wrote wrong bytes with exit 0.
#[test]
fn a_forged_parent_or_stand_in_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = noise(5, 32 * CS);
    let mut changed = base.clone();
    changed[..2 * CS].copy_from_slice(&noise(6, 2 * CS));
    let (full, inc) = chain_of(d, &base, &changed);
    let real = Archive::read(&full);
    let want = Archive::read(&inc).header.parent.unwrap();
    // Other data of the same layout.
    let other_path = archive_of(&d.join("x"), "other", &noise(7, 32 * CS));
    let other = Archive::read(&other_path);
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::rename(&full, elsewhere.join("full.vma")).unwrap();
    let _ = &other_path;

    // 1. The parent's uuid, other content, every digest honest.
    let forged = with_uuid(&other, want.uuid);
    forged.write(&full);
    let out = d.join("out1");
    let o = vma(&["extract", p(&inc), p(&out)]);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("not its content"), "{}", stderr(&o));
    assert!(!out.join("disk.raw").exists());

    // 2. The same, with the child's parent digest written into the footer
    // (what 2.0 accepted): the digest is recomputed, the field is refused.
    let mut bytes = forged.bytes();
    let n = bytes.len();
    let mut footer: [u8; 80] = bytes[n - 80..].try_into().unwrap();
    footer[32..64].copy_from_slice(&want.digest);
    let check = vma_tests::forge::sha(&footer[..72]);
    footer[72..].copy_from_slice(&check[..8]);
    bytes[n - 80..].copy_from_slice(&footer);
    std::fs::write(&full, &bytes).unwrap();
    let o = vma(&["extract", p(&inc), p(&d.join("out2"))]);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(!d.join("out2").join("disk.raw").exists());
    std::fs::remove_file(&full).unwrap();

    // 3. A stand-in claiming the parent's point in time: its records and
    // leaf pages are the real parent's (so its drive digests prove), its
    // extents hold other data.
    let mut stand_in = with_uuid(&other, [0x51; 16]);
    stand_in.header.stands_for = vec![want];
    stand_in.header.compat |= vma_core::format::COMPAT_STANDS_FOR;
    stand_in.records = real.records.clone();
    stand_in.leaves = real.leaves.clone();
    stand_in.write(&d.join("stand-in.vma"));
    let out = d.join("out3");
    let o = vma(&["extract", p(&inc), p(&out)]);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(!out.join("disk.raw").exists());
    // Mounted, no byte of the stand-in's other data is ever served.
    let (m, _) = Mounted::attempt(&inc, &d.join("mnt"), &[], 0);
    let m = m.unwrap();
    for c in 2..32 {
        if let Ok(got) = pread(&m.path("disk.raw"), (c * CS) as u64, CS) {
            assert!(got == changed[c * CS..(c + 1) * CS], "cluster {c}");
        }
    }
    m.unmount();

    // The real parent, put back, works.
    std::fs::remove_file(d.join("stand-in.vma")).unwrap();
    std::fs::rename(elsewhere.join("full.vma"), &full).unwrap();
    let out = d.join("out4");
    ok(&["extract", "-q", p(&inc), p(&out)]);
    assert!(std::fs::read(out.join("disk.raw")).unwrap() == changed);
}

/// A damaged full folded by merge and prune. 2.0: merge never read the
/// full's extents that later links superseded, and wrote an archive that
/// verify called intact; prune did the same and deleted the damaged full.
#[test]
fn merge_and_prune_refuse_a_damaged_link() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("chain");
    std::fs::create_dir_all(&d).unwrap();
    let base = noise(8, 32 * CS);
    // The first four clusters (the full's first extent) all change.
    let mut changed = base.clone();
    changed[..4 * CS].copy_from_slice(&noise(9, 4 * CS));
    let (full, inc) = chain_of(&d, &base, &changed);
    // Damage in the full's first extent: superseded at the incremental's point.
    let table = Archive::read(&full).placed_table();
    let at = table[0].offset.get() + table[0].len as u64 / 2;
    let f = std::fs::OpenOptions::new().write(true).open(&full).unwrap();
    f.write_all_at(&[0x5a ^ pread(&full, at, 1).unwrap()[0]], at)
        .unwrap();
    let merged = t.path().join("merged.vma");
    let o = vma(&["merge", p(&inc), "-o", p(&merged)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("damaged"), "{}", stderr(&o));
    assert!(!merged.exists());
    let before: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let o = vma(&["prune", p(&d), "--keep-last", "1"]);
    assert_ne!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    for p in &before {
        assert!(
            p.exists(),
            "prune deleted {} although the fold failed",
            p.display()
        );
    }
    assert!(pread(&inc, 0, 8).unwrap() == *b"\x89VMA\r\n\x1a\n");
}

/// The newest archive records a drive digest its content does not have
/// (every other digest valid). 2.0: merge computed and recorded its own
/// digest, ignoring the recorded one, and wrote a "clean" archive.
#[test]
fn merge_checks_the_recorded_drive_digest() {
    let t = tempfile::tempdir().unwrap();
    let base = noise(10, 16 * CS);
    let mut changed = base.clone();
    changed[CS..2 * CS].copy_from_slice(&noise(11, CS));
    let (_, inc) = chain_of(t.path(), &base, &changed);
    let mut a = Archive::read(&inc);
    a.records[0].digest = Some([0x42; 32]);
    a.write(&inc);
    let merged = t.path().join("merged.vma");
    let o = vma(&["merge", p(&inc), "-o", p(&merged)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("drive digest"), "{}", stderr(&o));
    assert!(!merged.exists());
    let o = vma(&["verify", p(&inc)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
}

/// Salvage of `archive`: extract and mount agree; returns the report and
/// the extracted drive.
fn salvage(dir: &Path, archive: &Path) -> (Value, Vec<u8>) {
    let out = dir.join("salvaged");
    let _ = std::fs::remove_dir_all(&out);
    let o = vma(&["extract", "--salvage", "--json", p(archive), p(&out)]);
    assert!(code(&o) <= 1, "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let extracted = std::fs::read(out.join("disk.raw")).unwrap();
    let (m, o) = Mounted::attempt(
        archive,
        &dir.join("smnt"),
        &["--salvage", "--json"],
        code(&o),
    );
    let m = m.unwrap();
    let mounted: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        mounted["lost"], report["lost"],
        "mount and extract disagree on what is lost"
    );
    assert!(
        std::fs::read(m.path("disk.raw")).unwrap() == extracted,
        "mount --salvage and extract --salvage give different bytes"
    );
    m.unmount();
    (report, extracted)
}

/// The lost byte ranges of a salvage report.
fn lost(report: &Value) -> Vec<(u64, u64)> {
    report["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap()))
        .collect()
}

/// `data`, except zeros over `lost`.
fn zeroed(data: &[u8], lost: &[(u64, u64)]) -> Vec<u8> {
    let mut v = data.to_vec();
    for &(s, e) in lost {
        v[s as usize..e as usize].fill(0);
    }
    v
}

/// A drive holding an uncompressed archive (a backup of a backup server),
/// and one flipped bit in the outer extent header before it. 2.0: resync
/// locked onto the inner archive's extent headers (their self-checks are
/// valid) and wrote the inner data as recovered data of the outer drive.
#[test]
fn salvage_never_takes_extents_of_an_archive_stored_inside() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let inner = archive_of(&d.join("i"), "inner", &noise(12, 12 * CS));
    let mut disk = std::fs::read(&inner).unwrap();
    disk.resize(disk.len().next_multiple_of(CS) + 8 * CS, 0);
    let n = disk.len();
    disk[n - 8 * CS..].copy_from_slice(&noise(13, 8 * CS));
    let outer = archive_of(d, "outer", &disk);
    let parsed = Archive::read(&outer);
    let table = parsed.placed_table();
    let first = ExtentParts::parse(&parsed.extents[0]);
    let first_end = first
        .entries
        .iter()
        .map(|e| e.start + e.count as u64)
        .max()
        .unwrap();
    // The first outer extent's header: one bit of its seq field.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&outer)
        .unwrap();
    let at = table[0].offset.get() + 27;
    f.write_all_at(&[pread(&outer, at, 1).unwrap()[0] ^ 0x10], at)
        .unwrap();
    let (report, got) = salvage(d, &outer);
    let lost = lost(&report);
    assert_eq!(lost, vec![(0, first_end * CS as u64)], "{report}");
    assert!(
        got == zeroed(&disk, &lost),
        "salvage wrote bytes that are not the drive's"
    );
}

/// Damaged data holding index magic bytes: resynchronising must skip them.
/// 2.0: a stray `VMA2IDX\0` ended the salvage pass, and every intact
/// extent after it was reported lost.
#[test]
fn stray_index_magic_in_damaged_data_is_skipped() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let mut disk = noise(14, 48 * CS);
    for at in [1000, 70_000, 130_000] {
        disk[at..at + 8].copy_from_slice(b"VMA3IDX\0");
    }
    let archive = archive_of(d, "a", &disk);
    let table = Archive::read(&archive).placed_table();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&archive)
        .unwrap();
    let at = table[0].offset.get() + 50;
    f.write_all_at(&[pread(&archive, at, 1).unwrap()[0] ^ 1], at)
        .unwrap();
    let (report, got) = salvage(d, &archive);
    let lost = lost(&report);
    assert_eq!(lost, vec![(0, 4 * CS as u64)], "{report}");
    assert!(got == zeroed(&disk, &lost));
}

/// Two intact extents holding one cluster: different bytes are a conflict
/// (zeros and reported, the same way by extract and mount; verify reports
/// it; merge refuses); the same bytes a duplicate (reported, data used).
/// 2.0: extract --salvage wrote the second copy, mount --salvage served
/// the first, neither reported anything lost, and merge made a clean archive.
#[test]
fn two_copies_of_a_cluster_are_handled_the_same_everywhere() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let disk = noise(15, 16 * CS);
    let archive = archive_of(d, "a", &disk);
    for (name, second) in [
        ("conflict", noise(16, CS)),
        ("duplicate", disk[2 * CS..3 * CS].to_vec()),
    ] {
        let mut a = Archive::read(&archive);
        let seq = a.extents.len() as u64;
        let mut parts = ExtentParts::parse(&a.extents[0]);
        parts.entries = vec![vma_core::format::Entry {
            drive: vma_core::DriveId(1),
            kind: vma_core::format::RunKind::Data,
            count: 1,
            start: 2,
        }];
        parts.masks = vec![u16::MAX];
        parts.payload = second.clone();
        a.extents.push(parts.frame(a.header.uuid, seq));
        a.table = None;
        let forged = d.join(format!("{name}.vma"));
        a.write(&forged);
        let o = vma(&["verify", "--json", p(&forged)]);
        assert_eq!(code(&o), 1, "{name}");
        let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
        let kinds: Vec<&str> = rep["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["kind"].as_str().unwrap())
            .collect();
        assert!(
            kinds.contains(&name.replace("conflict", "conflicting").as_str()),
            "{name}: {rep}"
        );
        let (report, got) = salvage(d, &forged);
        if name == "conflict" {
            assert_eq!(
                lost(&report),
                vec![(2 * CS as u64, 3 * CS as u64)],
                "{report}"
            );
            assert!(got == zeroed(&disk, &[(2 * CS as u64, 3 * CS as u64)]));
        } else {
            assert_eq!(lost(&report), vec![], "{report}");
            assert!(got == disk);
        }
        let merged = d.join(format!("{name}-merged.vma"));
        let o = vma(&["merge", p(&forged), "-o", p(&merged)]);
        assert_eq!(code(&o), 1, "{name}: merge: {}", stderr(&o));
        assert!(!merged.exists());
    }
}

/// A tiny archive declaring 255 drives of 128 TiB (all zero), drive
/// digests recorded. 2.0: verify hashed the zeros of a declared 16 TiB
/// drive for about 6 hours (255 such drives: years), silently.
#[test]
fn huge_declared_drives_verify_in_seconds() {
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("huge.vma");
    vma_tests::scale::huge(&archive);
    assert!(std::fs::metadata(&archive).unwrap().len() < 200 << 10);
    let started = Instant::now();
    let o = ok(&["verify", p(&archive)]);
    assert!(o.contains("OK: archive is intact"), "{o}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "verify took {took:?}");
    let started = Instant::now();
    let o = sh(&format!("\"$VMA\" verify - < {}", p(&archive)));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(started.elapsed() < Duration::from_secs(10));
    let o = ok(&["checksum", p(&archive)]);
    assert_eq!(o.lines().count(), 255);
}

/// The extent table of an archive points somewhere else: into another
/// extent (rollback of part of the file). Caught by random access too.
#[test]
fn an_extent_table_record_must_match_the_extent_there() {
    let t = tempfile::tempdir().unwrap();
    let disk = noise(17, 16 * CS);
    let archive = archive_of(t.path(), "a", &disk);
    let mut a = Archive::read(&archive);
    let mut table = a.placed_table();
    table.swap(1, 2);
    a.table = Some(table.iter().map(|r| ExtentRecord { ..*r }).collect());
    a.write(&archive);
    let r = vma_core::Reader::open(&archive).unwrap();
    let mut buf = vec![0u8; disk.len()];
    let err = r.read_at(vma_core::DriveId(1), 0, &mut buf).unwrap_err();
    assert!(err.to_string().contains("belongs"), "{err}");
}

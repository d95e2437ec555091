//! `--salvage` for `extract` and `mount` on damaged and truncated archives:
//! everything intact comes back byte for byte, everything lost reads as
//! zeros and is reported (drive and byte range, also as JSON), and the exit
//! code is 1. Mounts are real FUSE mounts.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vma_tests::*;

/// One sparse drive with an odd size and one small drive, plus a config.
fn sample(d: &Path, compress: &str, format: &str) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let disk = d.join("disk0.raw");
    sparse_image(
        &disk,
        24 * 1024 * 1024 + 333,
        &[
            (0, 700_000, 11),
            (5 << 20, 4096, 12),
            (9 << 20, 6 << 20, 13),
            (24 * 1024 * 1024 - 100, 433, 14),
        ],
    );
    std::fs::write(d.join("efi.raw"), noise(15, 256 * 1024 + 5)).unwrap();
    std::fs::write(d.join("qemu-server.conf"), b"cores: 2\n").unwrap();
    let archive = d.join("backup.vma");
    let o = vma(&[
        "create",
        "--quiet",
        "--format",
        format,
        "--compress",
        compress,
        p(&archive),
        "--config",
        p(&d.join("qemu-server.conf")),
        p(&disk),
        p(&d.join("efi.raw")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // VMA v1 stores drives in whole 512-byte sectors (a zero tail).
    let stored = |mut bytes: Vec<u8>| {
        if format == "vma1" {
            bytes.resize(bytes.len().next_multiple_of(512), 0);
        }
        bytes
    };
    let sources = vec![
        ("disk0".to_string(), stored(std::fs::read(&disk).unwrap())),
        (
            "efi".to_string(),
            stored(std::fs::read(d.join("efi.raw")).unwrap()),
        ),
    ];
    (archive, sources)
}

/// Lost ranges of one drive from a salvage report's `lost` list.
fn lost_of(report: &Value, drive: &str) -> Vec<(u64, u64)> {
    report["lost"]
        .as_array()
        .expect("lost is a list")
        .iter()
        .filter(|r| r["drive"] == drive)
        .map(|r| (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap()))
        .collect()
}

/// `got` equals `src` outside `lost` and is zero inside it.
fn assert_salvaged(what: &str, got: &[u8], src: &[u8], lost: &[(u64, u64)]) {
    assert_eq!(got.len(), src.len(), "{what}: size");
    let mut pos = 0usize;
    let mut lost = lost.to_vec();
    lost.sort();
    for (s, e) in lost {
        let (s, e) = (s as usize, e as usize);
        assert!(s >= pos && e <= src.len(), "{what}: bad range {s}..{e}");
        assert!(
            got[pos..s] == src[pos..s],
            "{what}: intact bytes {pos}..{s} differ"
        );
        assert!(
            got[s..e].iter().all(|&b| b == 0),
            "{what}: lost bytes {s}..{e} are not zeros"
        );
        pos = e;
    }
    assert!(
        got[pos..] == src[pos..],
        "{what}: intact bytes {pos}.. differ"
    );
}

/// Salvage `archive` by extract and by mount; both must report the same
/// lost ranges and give the same bytes, intact where not lost. Returns the
/// report.
fn salvage_both(d: &Path, archive: &Path, sources: &[(String, Vec<u8>)], want: i32) -> Value {
    let out = d.join(format!("out-{}", p(archive).len() + want as usize));
    let _ = std::fs::remove_dir_all(&out);
    let o = vma(&["extract", "--salvage", "--json", p(archive), p(&out)]);
    assert_eq!(code(&o), want, "extract --salvage: {}", stderr(&o));
    let extracted: Value = serde_json::from_slice(&o.stdout).expect("extract --json");
    if want == 1 {
        assert!(
            stderr(&o).contains("could not be recovered"),
            "{}",
            stderr(&o)
        );
    }
    let mp = d.join("mnt");
    let (m, o) = Mounted::attempt(archive, &mp, &["--salvage", "--json"], want);
    let m = m.expect("salvage mount is made even when data is lost");
    let mounted: Value = serde_json::from_slice(&o.stdout).expect("mount --json");
    let shown: Value =
        serde_json::from_slice(&std::fs::read(m.path("salvage.json")).unwrap()).unwrap();
    assert_eq!(
        shown, mounted,
        "salvage.json differs from the printed report"
    );
    for (name, src) in sources {
        let lost = lost_of(&mounted, name);
        assert_eq!(
            lost,
            lost_of(&extracted, name),
            "extract and mount disagree on what drive {name} lost"
        );
        let via_mount = std::fs::read(m.path(&format!("{name}.raw"))).unwrap();
        assert_salvaged(&format!("mount {name}"), &via_mount, src, &lost);
        let via_extract = std::fs::read(out.join(format!("{name}.raw"))).unwrap();
        assert_salvaged(&format!("extract {name}"), &via_extract, src, &lost);
    }
    assert_eq!(mounted["ok"], Value::Bool(want == 0), "{mounted}");
    m.unmount();
    mounted
}

/// Offset of `needle` in `file`.
fn find(file: &Path, needle: &[u8]) -> usize {
    std::fs::read(file)
        .unwrap()
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("bytes found in the archive")
}

fn flip(file: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

#[test]
fn a_clean_archive_salvages_to_everything_and_exit_0() {
    let t = tempfile::tempdir().unwrap();
    let (archive, sources) = sample(t.path(), "zstd:1", "v2");
    let report = salvage_both(t.path(), &archive, &sources, 0);
    assert_eq!(report["lost"], serde_json::json!([]));
    assert_eq!(report["problems"], serde_json::json!([]));
}

#[test]
fn a_damaged_extent_is_zero_filled_and_reported_by_extract_and_mount() {
    // (VMA v1 has no data checksums, so a flipped data byte cannot be
    // found there; its damaged extent headers are tested below.)
    for (compress, format) in [("none", "v2"), ("zstd:3", "v2")] {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let (archive, sources) = sample(d, compress, format);
        // Damage data of the 6 MiB region of disk0 (found in the archive
        // when stored uncompressed; else the middle of the file).
        let at = if compress == "none" {
            find(&archive, &noise(13, 6 << 20)[2 << 20..(2 << 20) + 64]) as u64
        } else {
            std::fs::metadata(&archive).unwrap().len() / 2
        };
        flip(&archive, at);
        let report = salvage_both(d, &archive, &sources, 1);
        let lost = lost_of(&report, "disk0");
        assert!(
            !lost.is_empty(),
            "{compress}/{format}: nothing reported lost"
        );
        let lost_bytes: u64 = lost.iter().map(|(s, e)| e - s).sum();
        assert!(
            lost_bytes <= 2 << 20,
            "{compress}: {lost_bytes} bytes lost for one flipped byte"
        );
        assert!(
            report["problems"][0]["offset"].as_u64().is_some(),
            "problems name the file offset: {report}"
        );
    }
}

#[test]
fn vma1_damaged_extent_header_is_zero_filled() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, sources) = sample(d, "none", "vma1");
    // The second extent header: the first VMA extent magic after the header.
    let bytes = std::fs::read(&archive).unwrap();
    let headers: Vec<usize> = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"VMAE")
        .map(|(i, _)| i)
        .collect();
    assert!(headers.len() > 3, "too few extents");
    flip(&archive, headers[2] as u64 + 40);
    let report = salvage_both(d, &archive, &sources, 1);
    assert!(!lost_of(&report, "disk0").is_empty() || !lost_of(&report, "efi").is_empty());
}

#[test]
fn a_damaged_index_loses_nothing_but_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, sources) = sample(d, "zstd:1", "v2");
    let at = find(&archive, b"VMA3IDX\0") as u64;
    flip(&archive, at + 40);
    let report = salvage_both(d, &archive, &sources, 1);
    assert_eq!(report["lost"], serde_json::json!([]), "{report}");
    assert!(!report["problems"].as_array().unwrap().is_empty());
}

#[test]
fn truncated_archives_give_back_everything_before_the_cut() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, sources) = sample(d, "zstd:1", "v2");
    let whole = std::fs::read(&archive).unwrap();
    let len = whole.len();
    // Cuts: just after the header, inside extents, at the index, inside the footer.
    let index_at = find(&archive, b"VMA3IDX\0");
    let mut cuts = vec![index_at, len - 1, len - 80];
    for k in 1..6 {
        cuts.push(len * k / 7);
    }
    let header_end = find(&archive, b"VMA3EXT\0");
    cuts.push(header_end);
    cuts.push(header_end + 100);
    // Longest first: each shorter file loses at least as much.
    let mut lost_longer = 0;
    cuts.sort();
    cuts.reverse();
    for cut in cuts {
        let cut_file = d.join(format!("cut-{cut}.vma"));
        std::fs::write(&cut_file, &whole[..cut]).unwrap();
        let o = vma(&["verify", p(&cut_file)]);
        assert_eq!(code(&o), 1, "verify of a cut at {cut}: {}", stderr(&o));
        let report = salvage_both(d, &cut_file, &sources, 1);
        let lost: u64 = ["disk0", "efi"]
            .iter()
            .flat_map(|n| lost_of(&report, n))
            .map(|(s, e)| e - s)
            .sum();
        assert!(
            lost >= lost_longer,
            "cut at {cut} lost {lost} bytes, a longer file lost {lost_longer}"
        );
        lost_longer = lost;
        std::fs::remove_file(&cut_file).unwrap();
    }
}

#[test]
fn a_cut_inside_the_header_is_a_clear_error_not_a_mount() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, _) = sample(d, "zstd:1", "v2");
    let whole = std::fs::read(&archive).unwrap();
    let cut_file = d.join("cut.vma");
    std::fs::write(&cut_file, &whole[..100]).unwrap();
    let (m, o) = Mounted::attempt(&cut_file, &d.join("mnt"), &["--salvage"], 1);
    assert!(
        m.is_none(),
        "a mount was made of an archive without a header"
    );
    assert!(stderr(&o).contains("offset"), "{}", stderr(&o));
    let o = vma(&["extract", "--salvage", p(&cut_file), p(&d.join("out"))]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(!d.join("out").join("disk0.raw").exists());
}

#[test]
fn damage_in_an_ancestor_is_salvaged_through_the_chain() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (full, sources) = sample(d, "none", "v2");
    // The newer disk: the first MiB rewritten, the rest as in the full.
    let newer = d.join("newer").join("disk0.raw");
    std::fs::create_dir_all(newer.parent().unwrap()).unwrap();
    let mut disk = sources[0].1.clone();
    disk[..1 << 20].copy_from_slice(&noise(99, 1 << 20));
    std::fs::write(&newer, &disk).unwrap();
    let inc = d.join("inc.vma");
    diff_archive(&full, &newer, &inc);
    // Damage the full where the incremental says "unchanged".
    flip(
        &full,
        find(&full, &noise(13, 6 << 20)[3 << 20..(3 << 20) + 64]) as u64,
    );

    let out = d.join("out");
    let o = vma(&["extract", p(&inc), p(&out), "--drive", "disk0"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(!out.join("disk0.raw").exists());
    let o = vma(&[
        "extract",
        "--salvage",
        "--json",
        p(&inc),
        p(&out),
        "--drive",
        "disk0",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let lost = lost_of(&report, "disk0");
    assert!(!lost.is_empty(), "{report}");
    let got = std::fs::read(out.join("disk0.raw")).unwrap();
    assert_salvaged("extract through the chain", &got, &disk, &lost);

    // The mount answers the same ranges with zeros and logs them.
    let log = d.join("mount.log");
    let (m, _) = Mounted::attempt(&inc, &d.join("mnt"), &["--salvage", "--log", p(&log)], 0);
    let m = m.unwrap();
    let via_mount = std::fs::read(m.path("disk0.raw")).unwrap();
    assert_salvaged("mount through the chain", &via_mount, &disk, &lost);
    m.unmount();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("read as zeros (salvage)"), "{logged}");
}

#[test]
fn extract_json_lists_every_file_written_with_its_size() {
    let t = tempfile::tempdir().unwrap();
    let (archive, sources) = sample(t.path(), "zstd:1", "v2");
    let out = t.path().join("out");
    let o = vma(&["extract", "--json", p(&archive), p(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).expect("extract --json");
    // The damage report's keys and `files`, all at the top level.
    for key in [
        "ok",
        "problems",
        "damaged",
        "missing",
        "conflicting",
        "lost",
    ] {
        assert!(doc.get(key).is_some(), "no {key}: {doc}");
    }
    assert_eq!(doc["lost_bytes"], 0, "{doc}");
    let files = doc["files"].as_array().expect("files is a list");
    for (name, src) in &sources {
        let path = out.join(format!("{name}.raw"));
        let f = files
            .iter()
            .find(|f| f["path"] == p(&path))
            .unwrap_or_else(|| panic!("{} not listed: {doc}", path.display()));
        assert_eq!(f["size"], src.len() as u64, "{doc}");
    }
    assert!(
        files
            .iter()
            .any(|f| f["path"].as_str().unwrap().ends_with("qemu-server.conf") && f["size"] == 9),
        "the config is listed: {doc}"
    );
}

//! End-to-end tests of every `vma` command through the built binary, with
//! real files and pipes.

use std::path::Path;

use vma_tests::*;

/// Two drives (one sparse with an odd size, one small) and two configs.
fn sample(dir: &Path) -> std::path::PathBuf {
    let disk = dir.join("disk0.raw");
    sparse_image(
        &disk,
        50 * 1024 * 1024 + 513,
        &[
            (0, 300_000, 1),
            (7 << 20, 4096, 2),
            (50 * 1024 * 1024 - 100, 613, 3),
        ],
    );
    let efi = dir.join("efi.img");
    std::fs::write(&efi, noise(4, 128 * 1024 + 5)).unwrap();
    std::fs::write(dir.join("qemu-server.conf"), b"cores: 2\nmemory: 2048\n").unwrap();
    std::fs::write(dir.join("fw"), b"[OPTIONS]\nenable: 1\n").unwrap();
    let archive = dir.join("backup.vma");
    let o = vma(&[
        "create",
        "--quiet",
        p(&archive),
        "--config",
        p(&dir.join("qemu-server.conf")),
        "--config",
        &format!("firewall.fw={}", p(&dir.join("fw"))),
        p(&disk),
        &format!("drive-efi={}", p(&efi)),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    archive
}

#[test]
fn create_list_config_verify_extract() {
    let t = tempfile::tempdir().unwrap();
    let archive = sample(t.path());

    let o = vma(&["list", "--json", p(&archive)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["format", "version", "uuid", "ctime", "drives", "configs"] {
        assert!(doc.get(key).is_some(), "list --json lacks {key}");
    }
    assert_eq!(doc["format"], "vma");
    assert_eq!(doc["version"], "3.0");
    let drives = doc["drives"].as_array().unwrap();
    assert_eq!(drives[0]["name"], "disk0");
    assert_eq!(drives[0]["id"], 1);
    assert_eq!(drives[0]["size"], 50 * 1024 * 1024 + 513);
    assert_eq!(drives[1]["name"], "drive-efi");
    assert_eq!(doc["configs"][0]["name"], "qemu-server.conf");
    assert_eq!(doc["configs"][1]["name"], "firewall.fw");
    assert_eq!(doc["configs"][1]["size"], 20);

    let o = vma(&["list", p(&archive)]);
    assert!(
        stdout(&o).contains("drive-efi") && stdout(&o).contains("zstd:1"),
        "{}",
        stdout(&o)
    );

    let o = vma(&["config", p(&archive)]);
    assert_eq!(o.stdout, b"cores: 2\nmemory: 2048\n");
    let o = vma(&["config", p(&archive), "firewall.fw"]);
    assert_eq!(o.stdout, b"[OPTIONS]\nenable: 1\n");
    let o = vma(&["config", "--list", p(&archive)]);
    assert_eq!(stdout(&o), "qemu-server.conf\nfirewall.fw\n");
    let o = vma(&["config", p(&archive), "nope"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("no config named \"nope\""),
        "{}",
        stderr(&o)
    );

    let o = vma(&["verify", p(&archive)]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("OK: archive is intact"));
    let o = vma(&["verify", "--json", p(&archive)]);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["ok"], true);
    assert_eq!(rep["drives"][0]["digest_check"], "match");

    let out = t.path().join("out");
    let o = vma(&["extract", "--quiet", p(&archive), p(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let disk = t.path().join("disk0.raw");
    assert_eq!(
        std::fs::read(out.join("disk0.raw")).unwrap(),
        std::fs::read(&disk).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("drive-efi.raw")).unwrap(),
        std::fs::read(t.path().join("efi.img")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("qemu-server.conf")).unwrap(),
        b"cores: 2\nmemory: 2048\n"
    );
    assert_eq!(
        std::fs::read(out.join("firewall.fw")).unwrap(),
        b"[OPTIONS]\nenable: 1\n"
    );
    // Sparse: the 50 MiB drive holds ~310 KiB of data.
    assert!(
        allocated(&out.join("disk0.raw")) < 2 << 20,
        "extracted file is not sparse"
    );
    // The recorded drive digest is what `vma checksum` of the output gives.
    let o = vma(&["checksum", p(&out.join("disk0.raw"))]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        doc["drives"][0]["digest"].as_str().unwrap(),
        stdout(&o).split_whitespace().next().unwrap()
    );
    // And `vma checksum --sha256` is what sha256sum gives.
    let o = vma(&["checksum", "--sha256", p(&archive)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o)
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap(),
        sha256_file(&out.join("disk0.raw"))
    );
    // No temporary files remain.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    // Refuses to overwrite; --force does; --drive selects.
    let o = vma(&["extract", p(&archive), p(&out)]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("use --force"), "{}", stderr(&o));
    let sel = t.path().join("sel");
    let o = vma(&[
        "extract",
        "--quiet",
        "--drive",
        "drive-efi",
        p(&archive),
        p(&sel),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(sel.join("drive-efi.raw").exists() && !sel.join("disk0.raw").exists());
    let o = vma(&["extract", "--quiet", "--force", p(&archive), p(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = vma(&[
        "extract",
        "--drive",
        "nosuch",
        p(&archive),
        p(&t.path().join("x")),
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("no drive named \"nosuch\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn pipes_both_ways() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm-100-disk-0.raw");
    sparse_image(
        &img,
        9 * 1024 * 1024 + 1,
        &[(65536 * 3 + 100, 200_000, 11), (9 * 1024 * 1024 - 7, 8, 12)],
    );
    let dir = t.path().join("out");
    let o = sh(&format!(
        "\"$VMA\" create --quiet - {} | \"$VMA\" extract --quiet - {}",
        p(&img),
        p(&dir)
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::read(dir.join("vm-100-disk-0.raw")).unwrap(),
        std::fs::read(&img).unwrap()
    );

    let o = sh(&format!(
        "\"$VMA\" create --quiet --compress none - {} | \"$VMA\" verify -",
        p(&img)
    ));
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let o = sh(&format!(
        "\"$VMA\" create --quiet - {} | \"$VMA\" list --json -",
        p(&img)
    ));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["drives"][0]["name"], "vm-100-disk-0");
    // A stream cut short is reported as damaged from a pipe too.
    let o = sh(&format!(
        "\"$VMA\" create --quiet - {} | head -c 100000 | \"$VMA\" verify -",
        p(&img)
    ));
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("truncated"), "{}", stdout(&o));
}

#[test]
fn usage_errors_exit_2() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.raw");
    std::fs::write(&img, noise(1, 70_000)).unwrap();
    let arc = t.path().join("a.vma");
    for args in [
        vec!["create", p(&arc), "/nonexistent/disk.raw"],
        vec!["create", "--compress", "lz4", p(&arc), p(&img)],
        vec!["create", p(&arc), &format!("bad\u{1}name={}", p(&img))],
        vec!["list", "/nonexistent.vma"],
        vec!["frobnicate"],
    ] {
        let o = vma(&args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).lines().count() >= 1);
    }
    assert!(!arc.exists(), "a failed create left {}", arc.display());
    // An existing archive is not replaced without --force.
    let o = vma(&["create", "-q", p(&arc), p(&img)]);
    assert_eq!(code(&o), 0);
    let o = vma(&["create", "-q", p(&arc), p(&img)]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--force"));
    let o = vma(&["create", "-q", "--force", p(&arc), p(&img)]);
    assert_eq!(code(&o), 0);
}

#[test]
fn foreign_and_future_files_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let junk = t.path().join("junk");
    // Bytes that are nothing known (text is said to be text, see next_steps.rs).
    std::fs::write(&junk, b"\x00\x01\x02 binary junk, not an archive at all").unwrap();
    for cmd in ["list", "verify", "config"] {
        let o = vma(&[cmd, p(&junk)]);
        assert_eq!(code(&o), 1, "{cmd}");
        assert!(
            stderr(&o).contains("not a vma archive") && stderr(&o).contains("offset 0"),
            "{}",
            stderr(&o)
        );
    }
    let o = vma(&["extract", p(&junk), p(&t.path().join("o"))]);
    assert_eq!(code(&o), 1);

    let img = t.path().join("a.raw");
    std::fs::write(&img, noise(1, 70_000)).unwrap();
    let arc = t.path().join("a.vma");
    assert_eq!(code(&vma(&["create", "-q", p(&arc), p(&img)])), 0);
    let mut bytes = std::fs::read(&arc).unwrap();
    bytes[8] = 4; // major version
    std::fs::write(&arc, &bytes).unwrap();
    let o = vma(&["list", p(&arc)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("version 4.0"), "{}", stderr(&o));

    // A broken zstd stream is recognised as one and reported as damage.
    std::fs::write(&junk, b"\x28\xb5\x2f\xfd\x00\x00\x00\x00\x00").unwrap();
    let o = vma(&["list", p(&junk)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("zstd") && stderr(&o).contains("damaged"),
        "{}",
        stderr(&o)
    );
}

/// Every byte of an archive is covered by a check: flips anywhere make
/// verify fail with exit 1, and extract leaves no output under a final name.
#[test]
fn corruption_is_reported_with_offsets() {
    let t = tempfile::tempdir().unwrap();
    let archive = sample(t.path());
    let good = std::fs::read(&archive).unwrap();
    let len = good.len();
    let mut offsets: Vec<usize> = vec![
        0,
        9,
        70,
        200,
        len / 3,
        len / 2,
        len - 2000,
        len - 200,
        len - 81,
        len - 40,
        len - 1,
    ];
    offsets.extend((1..20).map(|i| i * len / 20));
    for off in offsets {
        let mut bad = good.clone();
        bad[off] ^= 0x40;
        let f = t.path().join("bad.vma");
        std::fs::write(&f, &bad).unwrap();
        let o = vma(&["verify", p(&f)]);
        assert_eq!(code(&o), 1, "flip at {off}: {}{}", stdout(&o), stderr(&o));
        let text = stdout(&o) + &stderr(&o);
        assert!(
            text.contains("offset"),
            "flip at {off}: no offset named: {text}"
        );
        let out = t.path().join(format!("x{off}"));
        let o = vma(&["extract", "-q", p(&f), p(&out)]);
        assert_eq!(code(&o), 1, "extract of flip at {off}: {}", stderr(&o));
        if out.exists() {
            let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
            assert!(
                left.is_empty(),
                "extract of a damaged archive left {left:?}"
            );
        }
    }
}

#[test]
fn damaged_extent_names_drive_and_range() {
    let t = tempfile::tempdir().unwrap();
    let archive = sample(t.path());
    let mut bad = std::fs::read(&archive).unwrap();
    // Past the header: inside the first extent's payload.
    let o = vma(&["list", "--json", p(&archive)]);
    let _doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pos = bad.windows(8).position(|w| w == b"VMA3EXT\0").unwrap() + 64 + 16 + 8 + 5000;
    bad[pos] ^= 1;
    std::fs::write(&archive, &bad).unwrap();
    let o = vma(&["verify", "--json", p(&archive)]);
    assert_eq!(code(&o), 1);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["ok"], false);
    let problem = &rep["problems"][0];
    assert_eq!(problem["kind"], "extent-damaged");
    assert_eq!(problem["ranges"][0]["drive"], "disk0");
    assert_eq!(problem["ranges"][0]["start"], 0);
    assert!(
        problem["message"].as_str().unwrap().contains("drive disk0"),
        "{problem}"
    );
}

#[test]
fn truncation_at_many_offsets() {
    let t = tempfile::tempdir().unwrap();
    let archive = sample(t.path());
    let good = std::fs::read(&archive).unwrap();
    let len = good.len();
    let cuts = [
        0,
        5,
        63,
        64,
        100,
        500,
        len / 4,
        len / 2,
        len * 3 / 4,
        len - 81,
        len - 80,
        len - 79,
        len - 1,
    ];
    for cut in cuts {
        let f = t.path().join("short.vma");
        std::fs::write(&f, &good[..cut]).unwrap();
        let o = vma(&["verify", p(&f)]);
        assert_eq!(code(&o), 1, "cut at {cut}: {}{}", stdout(&o), stderr(&o));
        let out = t.path().join(format!("cut{cut}"));
        let o = vma(&["extract", "-q", p(&f), p(&out)]);
        assert_eq!(code(&o), 1, "extract of cut at {cut}: {}", stderr(&o));
        assert!(!out.join("disk0.raw").exists());
        let o = sh(&format!(
            "head -c {cut} {} | \"$VMA\" extract -q - {}",
            p(&archive),
            p(&out)
        ));
        assert_eq!(code(&o), 1, "piped extract of cut at {cut}: {}", stderr(&o));
        assert!(!out.join("disk0.raw").exists());
    }
    // Cut after the last extent: the message says the writer may have been interrupted.
    let idx = good.windows(8).rposition(|w| w == b"VMA3IDX\0").unwrap();
    let f = t.path().join("short.vma");
    std::fs::write(&f, &good[..idx]).unwrap();
    let o = vma(&["verify", p(&f)]);
    assert!(stdout(&o).contains("without its index"), "{}", stdout(&o));
}

/// A name that would escape the target directory is refused even when the
/// header's digest is valid.
#[test]
fn unsafe_names_never_escape() {
    use sha2::{Digest, Sha256};
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.raw");
    std::fs::write(&img, noise(1, 5000)).unwrap();
    let arc = t.path().join("a.vma");
    let o = vma(&["create", "-q", p(&arc), &format!("..={}", p(&img))]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("refers to a directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        code(&vma(&[
            "create",
            "-q",
            p(&arc),
            &format!("xx.evil={}", p(&img))
        ])),
        0
    );
    let mut bytes = std::fs::read(&arc).unwrap();
    let hlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let pos = bytes[..hlen]
        .windows(7)
        .position(|w| w == b"xx.evil")
        .unwrap();
    bytes[pos..pos + 3].copy_from_slice(b"../");
    let digest = Sha256::digest(&bytes[..hlen - 32]);
    bytes[hlen - 32..hlen].copy_from_slice(&digest);
    std::fs::write(&arc, &bytes).unwrap();
    let out = t.path().join("inner").join("out");
    let o = vma(&["extract", p(&arc), p(&out)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("path separator"), "{}", stderr(&o));
    assert!(!t.path().join("inner").join("evil.raw").exists());
    assert!(!t.path().join("evil.raw").exists());
}

#[test]
fn a_closed_output_pipe_is_an_error_not_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let archive = sample(t.path());
    for cmd in ["list --json", "list", "verify --json", "config"] {
        // The reader is gone before vma writes a byte.
        let o = sh(&format!(
            "(sleep 0.3; \"$VMA\" {cmd} {}; echo \"status $?\" >&2) | true",
            p(&archive)
        ));
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "vma {cmd}: {err}");
        assert!(err.contains("status 2"), "vma {cmd}: {err}");
        assert!(err.contains("Broken pipe"), "vma {cmd}: {err}");
    }
}

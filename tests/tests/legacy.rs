//! Archives of version 2.0 (written before 3.0, `tests/fixtures/v2`) stay
//! readable: list, verify, extract and mount them, chains and stand-ins
//! included; list and verify say what 2.0 cannot prove; a 3.0 archive is
//! never made on top of a 2.0 parent (convert the parent first), and a 2.0
//! chain merges into a 3.0 synthetic full that its children resolve against.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vma_tests::*;

const FULL: &str = "7025788658b3a7687fae197869a59be8f45904bc1fae0d9ade69ad37965001d4";
const INC1: &str = "745ed0a463dc6f0e34dc26f3c40ee1fb31e9082fa6a5495f100167db40f43c0a";
const INC2: &str = "7e9374fcfc1f603c44f5df6df56abb46e8f0b1ab520ee796fe13f4b569ee21f2";

/// The fixtures copied into a fresh directory (only `names`).
fn fixtures(names: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("v2");
    std::fs::create_dir_all(&d).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v2");
    for n in names {
        std::fs::copy(src.join(n), d.join(n)).unwrap();
    }
    (t, d)
}

fn ok(args: &[&str]) -> String {
    let o = vma(args);
    assert_eq!(code(&o), 0, "vma {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// The SHA-256 of drive `disk` of `archive` as extracted.
fn extracted(archive: &Path, out: &Path) -> String {
    ok(&["extract", "-q", p(archive), p(out)]);
    sha256_file(&out.join("disk.raw"))
}

#[test]
fn version_2_archives_list_verify_extract_and_mount() {
    let (_t, d) = fixtures(&["full.vma", "inc1.vma", "inc2.vma"]);
    let doc: Value =
        serde_json::from_str(&ok(&["list", "--json", p(&d.join("full.vma"))])).unwrap();
    assert_eq!(doc["version"], "2.0");
    assert_eq!(doc["drives"][0]["digest_kind"], "sha256");
    assert!(!doc["cannot_prove"].as_array().unwrap().is_empty());
    let text = ok(&["list", p(&d.join("inc1.vma"))]);
    assert!(text.contains("cannot prove"), "{text}");
    for a in ["full.vma", "inc1.vma", "inc2.vma"] {
        let out = ok(&["verify", p(&d.join(a))]);
        assert!(out.contains("OK: archive is intact"), "{a}: {out}");
        assert!(out.contains("cannot prove"), "{a}: {out}");
    }
    assert_eq!(extracted(&d.join("full.vma"), &d.join("x0")), FULL);
    assert_eq!(extracted(&d.join("inc1.vma"), &d.join("x1")), INC1);
    assert_eq!(extracted(&d.join("inc2.vma"), &d.join("x2")), INC2);
    let m = Mounted::new(&d.join("inc2.vma"), &d.join("mnt"), &[]);
    assert_eq!(sha256_file(&m.path("disk.raw")), INC2);
    m.unmount();
}

#[test]
fn version_2_stand_ins_still_resolve() {
    // The 2.0 synthetic full of inc1 stands in for inc1 (and full) for inc2.
    let (_t, d) = fixtures(&["merged1.vma", "inc2.vma"]);
    assert_eq!(extracted(&d.join("inc2.vma"), &d.join("x")), INC2);
    // A 3.0 synthetic full of the 2.0 chain stands in for it too: it
    // proves its own leaves, as 2.0 children name no state digest.
    let (_t2, e) = fixtures(&["full.vma", "inc1.vma", "inc2.vma"]);
    let merged = e.join("merged3.vma");
    ok(&["merge", "-q", p(&e.join("inc1.vma")), "-o", p(&merged)]);
    let doc: Value = serde_json::from_str(&ok(&["list", "--json", p(&merged)])).unwrap();
    assert_eq!(doc["version"], "3.0");
    std::fs::remove_file(e.join("full.vma")).unwrap();
    std::fs::remove_file(e.join("inc1.vma")).unwrap();
    assert_eq!(extracted(&e.join("inc2.vma"), &e.join("x")), INC2);
    ok(&["verify", p(&e.join("inc2.vma"))]);
}

#[test]
fn a_3_0_archive_is_never_made_on_top_of_a_2_0_parent() {
    let (_t, d) = fixtures(&["full.vma", "inc1.vma"]);
    let img = d.join("disk.img");
    std::fs::write(&img, vec![1u8; 1 << 20]).unwrap();
    let out = d.join("new.vma");
    let o = vma(&[
        "diff",
        "--against",
        p(&d.join("full.vma")),
        &format!("disk={}", p(&img)),
        "-o",
        p(&out),
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("convert the parent first"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    // A 2.0 incremental archive does not convert on its own ...
    let o = vma(&["convert", p(&d.join("inc1.vma")), p(&out)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("merge it into a full first"),
        "{}",
        stderr(&o)
    );
    // ... a full converts to 3.0, and the chain goes on from there.
    let full3 = d.join("full3.vma");
    ok(&["convert", "-q", p(&d.join("full.vma")), p(&full3)]);
    let doc: Value = serde_json::from_str(&ok(&["list", "--json", p(&full3)])).unwrap();
    assert_eq!(doc["version"], "3.0");
    assert_eq!(extracted(&full3, &d.join("xf")), FULL);
    ok(&[
        "diff",
        "-q",
        "--against",
        p(&full3),
        &format!("disk={}", p(&img)),
        "-o",
        p(&out),
    ]);
    ok(&["verify", p(&out)]);
}

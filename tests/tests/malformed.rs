//! Every malformed fixture of `tests/fixtures/malformed` (see its README)
//! gives the error it must: damage (exit 1) for archives, a refused disk
//! image (exit 2) for qcow2, with a message that names what is wrong and
//! where. One test per fixture, named after it.

use std::path::PathBuf;

use vma_tests::*;

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/malformed")
        .join(name);
    assert!(p.exists(), "missing fixture {}", p.display());
    p.display().to_string()
}

/// `vma verify` of fixture `name` fails with exit code 1 (damage) and
/// output that holds every one of `want`.
fn verify_fails(name: &str, want: &[&str]) {
    let o = vma(&["verify", &fixture(name)]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(code(&o), 1, "{name}: {text}");
    for w in want {
        assert!(text.contains(w), "{name}: expected {w:?} in:\n{text}");
    }
}

/// `vma checksum` of qcow2 fixture `name` refuses the image (exit 2)
/// with a message that holds every one of `want`.
fn qcow2_refused(name: &str, want: &[&str]) {
    let arg = format!("format=qcow2:{}", fixture(name));
    let o = vma(&["checksum", &arg]);
    let text = stderr(&o);
    assert_eq!(code(&o), 2, "{name}: {text}");
    for w in want {
        assert!(text.contains(w), "{name}: expected {w:?} in:\n{text}");
    }
}

#[test]
fn v3_bad_magic() {
    verify_fails(
        "v3-bad-magic.vma",
        &[
            "not a vma archive",
            "unknown magic bytes",
            "at offset 0",
            "expected a vma archive (format 3.0 or 2.0) or a Proxmox VMA archive",
        ],
    );
}

#[test]
fn v3_header_flipped() {
    verify_fails(
        "v3-header-flipped.vma",
        &["corrupt archive at offset", "header SHA-256 does not match"],
    );
}

#[test]
fn v3_truncated_header() {
    verify_fails(
        "v3-truncated-header.vma",
        &[
            "truncated at offset 40",
            "needs 64 bytes",
            "v3-truncated-header.vma",
        ],
    );
}

#[test]
fn v3_truncated_index() {
    verify_fails(
        "v3-truncated-index.vma",
        &[
            "truncated at offset 790",
            "index directory",
            "v3-truncated-index.vma",
        ],
    );
}

/// Offsets in messages are absolute (format-spec.md, "Offsets"): the cut
/// index names where the file ends, not how many of its bytes are there.
#[test]
fn v3_truncated_index_names_absolute_offsets() {
    let o = vma(&["verify", &fixture("v3-truncated-index.vma")]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        text.contains("index directory starting at offset 758 needs 120 bytes")
            && text.contains("v3-truncated-index.vma ends at offset 790"),
        "{text}"
    );
    assert!(!text.contains("ends after"), "{text}");
}

#[test]
fn v2_extent_flipped() {
    verify_fails(
        "v2-extent-flipped.vma",
        &[
            "extent #0 at offset 149 is damaged",
            "SHA-256 mismatch",
            "drive disk (1) bytes 0..524288",
        ],
    );
}

#[test]
fn v2_truncated() {
    verify_fails(
        "v2-truncated.vma",
        &[
            "truncated at offset 19736",
            "inside an extent header",
            "drive disk lacks 8 of its 16 clusters (512.0 KiB missing), at bytes 524288..1048576",
        ],
    );
}

#[test]
fn v1_header_md5() {
    verify_fails(
        "v1-header-md5.vma",
        &[
            "corrupt archive at offset 32",
            "VMA header MD5 does not match",
        ],
    );
}

#[test]
fn v1_truncated() {
    verify_fails(
        "v1-truncated.vma",
        &[
            "truncated at offset 16408",
            "VMA extent data starting at offset 13312",
            "drive small lacks 1 of its 1 clusters (4.0 KiB missing), at bytes 0..4096",
        ],
    );
}

#[test]
fn lzop_header_checksum() {
    verify_fails(
        "lzop-header-checksum.vma.lzo",
        &[
            "lzop stream: header checksum is 0x4f6005b1",
            "records 0x4f5605b0",
        ],
    );
}

#[test]
fn lzop_truncated() {
    verify_fails(
        "lzop-truncated.vma.lzo",
        &["lzop-truncated.vma.lzo", "lzop stream: ends at offset 56"],
    );
}

#[test]
fn qcow2_cluster_bits_40() {
    qcow2_refused(
        "qcow2-cluster-bits-40.qcow2",
        &[
            "qcow2-cluster-bits-40.qcow2",
            "cluster_bits 40 at offset 20",
        ],
    );
}

#[test]
fn qcow2_l1_past_eof() {
    qcow2_refused(
        "qcow2-l1-past-eof.qcow2",
        &[
            "qcow2-l1-past-eof.qcow2",
            "L1 table at offset 1099511627776",
            "beyond the end of the file",
        ],
    );
}

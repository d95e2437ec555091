//! qcow2 in and out, judged by the real tools: images made by `qemu-img`
//! and `qemu-io` archived and restored exactly; every qcow2 `vma` writes
//! passes `qemu-img check` and `qemu-img compare` with its source.

use std::path::{Path, PathBuf};

use vma_core::types::ClusterNo;
use vma_core::{ArchiveMeta, DriveId, DriveInfo, Writer, WriterOptions};
use vma_tests::*;

/// Run a shell script in `dir`; panics with its output on failure.
fn run(dir: &Path, script: &str) -> String {
    require("qemu-img");
    require("qemu-io");
    let o = sh(&format!("set -e; cd {}; {script}", p(dir)));
    assert_eq!(code(&o), 0, "{script}\n{}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// `qemu-img check` finds nothing and `qemu-img compare` finds `a` and `b` identical.
fn assert_checked_identical(dir: &Path, qcow2: &str, reference: &str) {
    let check = run(dir, &format!("qemu-img check {qcow2}"));
    assert!(check.contains("No errors were found"), "{check}");
    let cmp = run(dir, &format!("qemu-img compare {qcow2} {reference}"));
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

/// Archive `image`, extract it as raw and check it byte for byte against
/// what QEMU reads from the image, and against the recorded SHA-256.
fn assert_round_trip(dir: &Path, image: &str) {
    let name = Path::new(image).file_stem().unwrap().to_str().unwrap();
    run(dir, &format!("qemu-img convert -O raw {image} {name}.ref"));
    let archive = dir.join(format!("{name}.vma"));
    // Backing files may lie anywhere in `dir` (above the image, too).
    let o = vma(&[
        "create",
        "--quiet",
        "--allow-backing",
        p(dir),
        p(&archive),
        p(&dir.join(image)),
    ]);
    assert_eq!(code(&o), 0, "{image}: {}", stderr(&o));
    let out = dir.join(format!("{name}.out"));
    let o = vma(&["extract", "--quiet", p(&archive), p(&out)]);
    assert_eq!(code(&o), 0, "{image}: {}", stderr(&o));
    let restored = out.join(format!("{name}.raw"));
    let reference = dir.join(format!("{name}.ref"));
    assert_eq!(
        std::fs::read(&restored).unwrap(),
        std::fs::read(&reference).unwrap(),
        "{image} restored differs from what qemu-img reads"
    );
    // The drive digest recorded is what `vma checksum` gives for the
    // qcow2 image and for the raw image qemu-img reads from it.
    let o = vma(&["list", "--json", p(&archive)]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = vma(&[
        "checksum",
        "--allow-backing",
        p(dir),
        p(&dir.join(image)),
        p(&reference),
    ]);
    assert_eq!(code(&o), 0, "{image}: {}", stderr(&o));
    for line in stdout(&o).lines() {
        assert_eq!(
            doc["drives"][0]["digest"].as_str().unwrap(),
            line.split_whitespace().next().unwrap(),
            "{image}: {line}"
        );
    }
}

/// Guest writes used by several images: data, a sub-cluster write, a tail.
const PATTERNS: &str = "-c 'write -P 0x11 0 3M' -c 'write -P 0x5a 5M 512' -c 'write -P 0x22 9M 70k' -c 'write -P 0x33 30M 1536'";

#[test]
fn qcow2_inputs_of_every_kind_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // 30 MiB + 1.5 KiB: not a multiple of any cluster size.
    let size = 30 * 1024 * 1024 + 1536;
    run(
        d,
        &format!(
            "qemu-img create -q -f qcow2 plain.qcow2 {size}
             qemu-io -f qcow2 {PATTERNS} plain.qcow2 >/dev/null
             qemu-img create -q -f qcow2 -o cluster_size=4096 small.qcow2 {size}
             qemu-io -f qcow2 {PATTERNS} small.qcow2 >/dev/null
             qemu-img create -q -f qcow2 -o cluster_size=2M big.qcow2 {size}
             qemu-io -f qcow2 {PATTERNS} big.qcow2 >/dev/null
             qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 {size}
             qemu-io -f qcow2 {PATTERNS} v2.qcow2 >/dev/null
             head -c 4M /dev/urandom > mixed.raw
             truncate -s {size} mixed.raw
             qemu-io -f raw {PATTERNS} mixed.raw >/dev/null
             qemu-img convert -c -O qcow2 mixed.raw zlib.qcow2
             qemu-img convert -c -O qcow2 -o compression_type=zstd mixed.raw zstd.qcow2
             qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=8192 mixed.raw zstd8k.qcow2"
        ),
    );
    let info = run(d, "qemu-img info zstd.qcow2");
    assert!(info.contains("compression type: zstd"), "{info}");
    for image in [
        "plain.qcow2",
        "small.qcow2",
        "big.qcow2",
        "v2.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "zstd8k.qcow2",
    ] {
        assert_round_trip(d, image);
    }
}

#[test]
fn backing_chains_are_archived_as_the_guest_sees_them() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    run(
        d,
        "head -c 6M /dev/urandom > base.raw
         qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 40M
         qemu-io -f qcow2 -c 'write -P 0x44 1M 128k' -c 'write -z 2M 1M' -c 'write -P 0x45 20M 1M' mid.qcow2 >/dev/null
         mkdir sub
         qemu-img create -q -f qcow2 -b ../mid.qcow2 -F qcow2 sub/top.qcow2 48M
         qemu-io -f qcow2 -c 'write -P 0x66 1056k 4k' -c 'write -z 20M 64k' -c 'discard 3M 1M' -c 'write -P 0x67 47M 1M' sub/top.qcow2 >/dev/null
         qemu-img convert -c -O qcow2 -o compression_type=zstd -B ../mid.qcow2 -F qcow2 sub/top.qcow2 sub/ztop.qcow2",
    );
    assert_round_trip(d, "mid.qcow2");
    assert_round_trip(d, "sub/top.qcow2");
    assert_round_trip(d, "sub/ztop.qcow2");

    // A missing backing file is named.
    std::fs::remove_file(d.join("base.raw")).unwrap();
    let o = vma(&[
        "create",
        "--allow-backing",
        p(d),
        p(&d.join("x.vma")),
        p(&d.join("sub/top.qcow2")),
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("base.raw"), "{}", stderr(&o));
    assert!(!d.join("x.vma").exists());
}

#[test]
fn unsupported_and_damaged_qcow2_inputs_are_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    run(
        d,
        "qemu-img create -q -f qcow2 --object secret,id=s0,data=pw -o encrypt.format=luks,encrypt.key-secret=s0 luks.qcow2 10M
         qemu-img create -q -f qcow2 -o extended_l2=on sub.qcow2 10M
         qemu-img create -q -f qcow2 -o data_file=ext.data ext.qcow2 10M
         qemu-img create -q -f qcow2 good.qcow2 10M
         qemu-io -f qcow2 -c 'write -P 0x11 0 3M' good.qcow2 >/dev/null
         cp good.qcow2 truncated.qcow2; truncate -s 100000 truncated.qcow2
         cp good.qcow2 badl1.qcow2; printf '\\x7f\\x00\\x00\\x00\\x00\\x00\\x00\\x00' | dd of=badl1.qcow2 bs=1 seek=40 conv=notrunc status=none
         cp good.qcow2 badversion.qcow2; printf '\\x00\\x00\\x00\\x09' | dd of=badversion.qcow2 bs=1 seek=4 conv=notrunc status=none",
    );
    for (image, needle) in [
        ("luks.qcow2", "encryption (LUKS"),
        ("sub.qcow2", "subclusters"),
        ("ext.qcow2", "external data file"),
        ("truncated.qcow2", "truncated.qcow2"),
        ("badl1.qcow2", "L1 table"),
        ("badversion.qcow2", "qcow2 version 9"),
    ] {
        let archive = d.join(format!("{image}.vma"));
        let o = vma(&["create", p(&archive), p(&d.join(image))]);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{image}: {err}");
        assert!(
            err.contains(needle),
            "{image}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!archive.exists(), "{image}: an archive was left behind");
    }
}

/// A sample archive: an odd-sized sparse drive and a small dense one.
fn sample_archive(d: &Path) -> PathBuf {
    let disk = d.join("disk0.raw");
    sparse_image(
        &disk,
        700 * 1024 * 1024 + 777,
        &[
            (0, 300_000, 1),
            (7 << 20, 4096, 2),
            (600 << 20, 2 << 20, 5),
            (700 * 1024 * 1024 - 100, 877, 3),
        ],
    );
    std::fs::write(d.join("efi.raw"), noise(4, 128 * 1024 + 512)).unwrap();
    let archive = d.join("backup.vma");
    let o = vma(&[
        "create",
        "--quiet",
        p(&archive),
        p(&disk),
        p(&d.join("efi.raw")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    archive
}

#[test]
fn extract_to_qcow2_passes_qemu_img_check_and_compare() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let archive = sample_archive(d);
    for (dir, extra) in [("plain", ""), ("packed", "--compress")] {
        let o = sh(&format!(
            "\"$VMA\" extract --quiet --format qcow2 {extra} {} {}",
            p(&archive),
            p(&d.join(dir))
        ));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        for drive in ["disk0", "efi"] {
            assert_checked_identical(d, &format!("{dir}/{drive}.qcow2"), &format!("{drive}.raw"));
        }
        let info = run(d, &format!("qemu-img info {dir}/disk0.qcow2"));
        // The virtual size is the drive's, rounded up to whole sectors.
        assert!(info.contains("(734004224 bytes)"), "{info}");
        if extra.is_empty() {
            // Only the clusters holding data are allocated.
            let map = run(d, &format!("qemu-img map --output=json {dir}/disk0.qcow2"));
            let data: u64 = serde_json::from_str::<serde_json::Value>(&map)
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["data"] == true)
                .map(|e| e["length"].as_u64().unwrap())
                .sum();
            assert!(data <= 3_200_000, "{data} bytes mapped as data");
        } else {
            assert!(info.contains("compression type: zstd"), "{info}");
        }
    }
    // From standard input, in one pass.
    let o = sh(&format!(
        "cat {} | \"$VMA\" extract --quiet --format qcow2 --compress --drive disk0 - {}",
        p(&archive),
        p(&d.join("piped"))
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_checked_identical(d, "piped/disk0.qcow2", "disk0.raw");
    assert!(!d.join("piped/efi.qcow2").exists());

    // `--compress` needs qcow2.
    let o = vma(&["extract", "--compress", p(&archive), p(&d.join("x"))]);
    assert_eq!(code(&o), 2);
}

/// Clusters arriving in a scrambled order (as a live capture delivers
/// them) give the same qcow2 image.
#[test]
fn out_of_order_archives_extract_to_valid_qcow2() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let size: u64 = (1 << 30) + 3 * 65536 + 1000; // spans three L2 tables
    let clusters = size.div_ceil(65536);
    let mut img = vec![0u8; size as usize];
    // Data in about one cluster in forty, some clusters only partly.
    let mut order: Vec<u64> = (0..clusters)
        .filter(|c| c % 40 == 7 || *c == clusters - 1)
        .collect();
    let data_clusters = order.clone();
    for &c in &order {
        let start = (c * 65536) as usize;
        let end = (start + 65536).min(img.len());
        let len = if c % 3 == 0 {
            4096.min(end - start)
        } else {
            end - start
        };
        img[start..start + len].copy_from_slice(&noise(c, len));
    }
    // A fixed shuffle: reverse, then interleave halves.
    order.reverse();
    let (a, b) = order.split_at(order.len() / 2);
    let order: Vec<u64> = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| [*y, *x])
        .chain(b.iter().skip(a.len()).copied())
        .collect();
    let meta = ArchiveMeta::new(
        vec![DriveInfo {
            id: DriveId(1),
            name: "scrambled".into(),
            size,
        }],
        vec![],
    );
    let file = std::fs::File::create(d.join("ooo.vma")).unwrap();
    let mut w = Writer::new(file, meta, &WriterOptions::default()).unwrap();
    assert_eq!(order.len(), data_clusters.len());
    let mut written = vec![false; clusters as usize];
    for &c in &order {
        let start = (c * 65536) as usize;
        let end = (start + 65536).min(img.len());
        w.write_cluster(DriveId(1), ClusterNo(c), &img[start..end])
            .unwrap();
        written[c as usize] = true;
    }
    // The zero clusters, also out of order (from the end).
    let mut c = clusters;
    while c > 0 {
        let end = c;
        while c > 0 && !written[c as usize - 1] {
            c -= 1;
        }
        if c < end {
            w.write_zeros(DriveId(1), c..end).unwrap();
        }
        while c > 0 && written[c as usize - 1] {
            c -= 1;
        }
    }
    w.finish().unwrap();
    std::fs::write(d.join("scrambled.raw"), &img).unwrap();
    let o = vma(&[
        "extract",
        "--quiet",
        p(&d.join("ooo.vma")),
        p(&d.join("raw")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        std::fs::read(d.join("raw/scrambled.raw")).unwrap() == img,
        "raw extraction differs"
    );
    for extra in ["", "--compress"] {
        let out = d.join(format!("out{extra}"));
        let o = sh(&format!(
            "\"$VMA\" extract --quiet --format qcow2 {extra} {} {}",
            p(&d.join("ooo.vma")),
            p(&out)
        ));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert_checked_identical(d, &format!("{}/scrambled.qcow2", p(&out)), "scrambled.raw");
    }
}

/// More than 2 GiB of host clusters: refcounts span several refcount blocks.
#[test]
fn large_qcow2_outputs_span_refcount_blocks() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // One 4 KiB block in each of 33,000 clusters: 33,000 host clusters, 130 MiB written.
    let clusters = 33_000u64;
    let regions: Vec<(u64, usize, u64)> =
        (0..clusters).map(|c| (c * 65536 + 8192, 4096, c)).collect();
    let disk = d.join("wide.raw");
    sparse_image(&disk, clusters * 65536, &regions);
    let archive = d.join("wide.vma");
    let o = vma(&["create", "--quiet", p(&archive), p(&disk)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = vma(&[
        "extract",
        "--quiet",
        "--format",
        "qcow2",
        p(&archive),
        p(&d.join("out")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_checked_identical(d, "out/wide.qcow2", "wide.raw");
    let len = std::fs::metadata(d.join("out/wide.qcow2")).unwrap().len();
    assert!(
        len > (32_768 * 65536),
        "{len}: the test must cross a refcount block"
    );
    std::fs::remove_file(&disk).unwrap();
}

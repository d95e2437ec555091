//! Proxmox VMA v1 end to end: the real Proxmox-made backup in
//! `../shared/fixtures/proxmox/`, archives we write read by an independent
//! reader, whole-stream compression through pipes, conversions both ways.

use std::path::{Path, PathBuf};

use vma_tests::*;

/// The real, truncated Proxmox VE backup (never copied into this repository).
fn fixture() -> PathBuf {
    let path = std::env::var_os("VMA_PROXMOX_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/proxmox/test.vma.gz")
        });
    assert!(
        path.exists(),
        "the Proxmox fixture {} is missing: the repository must sit beside shared/ (or set VMA_PROXMOX_FIXTURE)",
        path.display()
    );
    path
}

const FIXTURE_UUID: &str = "04fc12eb-0fed-4322-9aaa-f4e412f68096";

#[test]
fn proxmox_backup_lists_and_prints_its_config() {
    let f = fixture();
    let o = vma(&["list", "--json", p(&f)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["format"], "proxmox-vma");
    assert_eq!(doc["version"], "1");
    assert_eq!(doc["uuid"], FIXTURE_UUID);
    assert_eq!(doc["ctime"], 1_635_680_622);
    assert_eq!(doc["compression"], "gzip (whole stream)");
    assert_eq!(doc["drives"][0]["id"], 1);
    assert_eq!(doc["drives"][0]["name"], "drive-scsi0");
    assert_eq!(doc["drives"][0]["size"], 10_737_418_240u64);
    assert_eq!(doc["drives"].as_array().unwrap().len(), 1);
    assert_eq!(doc["configs"][0]["name"], "qemu-server.conf");
    assert_eq!(doc["configs"][0]["size"], 417);

    // The same from a pipe, decompressed outside, and from an uncompressed file.
    let o = sh(&format!("zcat {} | \"$VMA\" list --json -", p(&f)));
    let piped: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(piped["uuid"], FIXTURE_UUID);
    assert_eq!(piped["compression"], "none");
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("vzdump-qemu-100.vma");
    assert_eq!(code(&sh(&format!("zcat {} > {}", p(&f), p(&raw)))), 0);
    let o = vma(&["list", p(&raw)]);
    assert_eq!(code(&o), 0);
    assert!(
        stdout(&o).contains("drive-scsi0") && stdout(&o).contains("proxmox-vma 1"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("incomplete"), "{}", stderr(&o));

    let o = vma(&["config", p(&f)]);
    assert_eq!(code(&o), 0);
    assert_eq!(o.stdout.len(), 417);
    assert!(o.stdout.starts_with(b"boot: order=scsi0"), "{}", stdout(&o));
    let o = vma(&["config", "--list", p(&raw)]);
    assert_eq!(stdout(&o), "qemu-server.conf\n");
}

#[test]
fn proxmox_backup_is_reported_incomplete() {
    let f = fixture();
    let o = vma(&["verify", p(&f)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let text = stdout(&o);
    assert!(
        text.contains("drive-scsi0 lacks 163724 of its 163840 clusters"),
        "{text}"
    );
    assert!(text.contains("no checksums over the data"), "{text}");
    let o = vma(&["verify", "--json", p(&f)]);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["ok"], false);
    assert_eq!(rep["extents"], 2);
    assert_eq!(rep["data_checksums"], false);
    assert_eq!(rep["problems"][0]["kind"], "incomplete");
    let missing: u64 = rep["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["end"].as_u64().unwrap() - r["start"].as_u64().unwrap())
        .sum();
    assert_eq!(missing, 163_724 * 65_536);

    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("restore");
    // (A 10 GiB sparse drive in a gzip stream: no free-space bound but its size.)
    let o = vma(&["extract", "--no-space-check", p(&f), p(&out)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("incomplete"), "{}", stderr(&o));
    assert!(!out.join("drive-scsi0.raw").exists());

    // Salvage writes the 116 clusters present, reports the gaps, exits 1.
    let o = vma(&["extract", "--salvage", "--no-space-check", p(&f), p(&out)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("lost (written as zeros): drive drive-scsi0"),
        "{}",
        stderr(&o)
    );
    let disk = out.join("drive-scsi0.raw");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 10_737_418_240);
    assert!(allocated(&disk) < 16 << 20, "salvaged disk is not sparse");
    assert_eq!(
        std::fs::read(out.join("qemu-server.conf")).unwrap().len(),
        417
    );
    // Cluster 0 is among those present (a full cluster in the first extent).
    use std::io::Read;
    let mut first = vec![0u8; 65536];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert!(
        first.iter().any(|&b| b != 0),
        "cluster 0 holds data in the fixture"
    );
}

/// Our VMA v1 output read by an independent implementation (the Python
/// `dissect.hypervisor` VMA reader, installed by scripts/setup.sh).
#[test]
fn vma1_we_write_is_read_by_an_independent_reader() {
    let python = std::env::var_os("VMA_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop-venv/bin/python")
        });
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh (it installs dissect.hypervisor==3.13 into target/interop-venv)",
        python.display()
    );
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk.raw");
    sparse_image(
        &disk,
        5 * 1024 * 1024 + 3 * 512,
        &[
            (0, 70_000, 5),
            (3 << 20, 4096 * 3 + 17, 6),
            (5 * 1024 * 1024, 1536, 7),
        ],
    );
    let conf = t.path().join("qemu-server.conf");
    std::fs::write(&conf, b"cores: 4\nscsi0: local:vm-100-disk-0\n").unwrap();
    let arc = t.path().join("vzdump.vma");
    let o = vma(&[
        "create",
        "-q",
        "--format",
        "vma1",
        p(&arc),
        "--config",
        p(&conf),
        &format!("drive-scsi0={}", p(&disk)),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let script = format!(
        "import hashlib\nfrom dissect.hypervisor.backup.vma import VMA\nv = VMA(open({:?}, 'rb'))\n\
         for d in v.devices():\n    data = d.open().read()\n    print(d.name, d.size, hashlib.sha256(data).hexdigest())\n\
         for n, c in v.configs().items():\n    print(n, hashlib.sha256(c).hexdigest())\n",
        p(&arc)
    );
    let o = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let disk_line = format!(
        "drive-scsi0 {} {}",
        5 * 1024 * 1024 + 1536,
        sha256_file(&disk)
    );
    assert!(out.contains(&disk_line), "{out}\nexpected {disk_line}");
    assert!(
        out.contains(&format!("qemu-server.conf {}", sha256_file(&conf))),
        "{out}"
    );
}

#[test]
fn compressed_streams_pipes_and_conversions() {
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("vm-101-disk-0.raw");
    sparse_image(
        &disk,
        3 * 1024 * 1024 + 4096 + 100,
        &[(65_536, 200_000, 8), (3 * 1024 * 1024, 4196, 9)],
    );
    let v1 = t.path().join("a.vma");
    assert_eq!(
        code(&vma(&[
            "create",
            "-q",
            "--format",
            "vma1",
            p(&v1),
            p(&disk)
        ])),
        0
    );

    // VMA v1 stores the drive in whole 512-byte sectors (a zero tail), as
    // QEMU presents it and Proxmox restores it.
    let mut sectors = std::fs::read(&disk).unwrap();
    sectors.resize(sectors.len().next_multiple_of(512), 0);
    require("lzop");
    for (tool, ext) in [
        ("zstd -q -c", "zst"),
        ("gzip -c", "gz"),
        ("lzop -1 -c", "lzo"),
        ("lzop -9 --crc32 -c", "lzo9"),
    ] {
        let out = t.path().join(format!("pipe-{ext}"));
        let o = sh(&format!(
            "{tool} {} | \"$VMA\" extract -q - {}",
            p(&v1),
            p(&out)
        ));
        assert_eq!(code(&o), 0, "{tool}: {}", stderr(&o));
        assert!(std::fs::read(out.join("vm-101-disk-0.raw")).unwrap() == sectors);
        let file = t.path().join(format!("a.vma.{ext}"));
        assert_eq!(code(&sh(&format!("{tool} {} > {}", p(&v1), p(&file)))), 0);
        let o = vma(&["verify", p(&file)]);
        assert_eq!(code(&o), 0, "{}", stdout(&o));
    }
    // A damaged compressed stream is damage (exit 1), not an I/O error,
    // and an lzop checksum names the block.
    for (ext, says) in [("gz", "damaged"), ("lzo", "checksum")] {
        let file = t.path().join(format!("a.vma.{ext}"));
        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let o = vma(&["verify", p(&file)]);
        assert_eq!(code(&o), 1, "{ext}: {}", stderr(&o));
        let said = format!("{}{}", stdout(&o), stderr(&o));
        assert!(said.contains(says), "{ext}: {said}");
    }
    // A truncated lzop header is damage, said plainly.
    let lzo = t.path().join("b.vma.lzo");
    std::fs::write(&lzo, b"\x89LZO\x00\r\n\x1a\n\x10\x30").unwrap();
    let o = vma(&["list", p(&lzo)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("lzop stream"), "{}", stderr(&o));

    // v1 -> v2 -> v1 keeps every byte; v2 verifies; from stdin too.
    let v2 = t.path().join("b.vma2");
    let o = sh(&format!(
        "cat {} | \"$VMA\" convert -q - {}",
        p(&v1),
        p(&v2)
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&vma(&["verify", "-q", p(&v2)])), 0);
    let back = t.path().join("c.vma");
    assert_eq!(
        code(&vma(&[
            "convert",
            "-q",
            "--format",
            "vma1",
            p(&v2),
            p(&back)
        ])),
        0
    );
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&v1).unwrap());
    // v2 -> v1 of an archive made by `create` extracts to the same disk
    // (in whole sectors).
    let made = t.path().join("made.vma2");
    assert_eq!(code(&vma(&["create", "-q", p(&made), p(&disk)])), 0);
    let o = sh(&format!(
        "\"$VMA\" convert -q --format vma1 {} - | \"$VMA\" extract -q - {}",
        p(&made),
        p(&t.path().join("x"))
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::read(t.path().join("x/vm-101-disk-0.raw")).unwrap() == sectors);
}

#[test]
fn vma1_damage_and_limits() {
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("d.raw");
    std::fs::write(&disk, noise(3, 300_000)).unwrap();
    let v1 = t.path().join("a.vma");
    assert_eq!(
        code(&vma(&[
            "create",
            "-q",
            "--format",
            "vma1",
            p(&v1),
            p(&disk)
        ])),
        0
    );
    let good = std::fs::read(&v1).unwrap();
    let header_len = u32::from_be_bytes(good[56..60].try_into().unwrap()) as usize;
    // Header and extent-header flips are caught by their MD5s.
    for (at, what) in [
        (10usize, "MD5"),
        (header_len + 45, "MD5"),
        (header_len + 6, "MD5"),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        std::fs::write(&v1, &bad).unwrap();
        let o = vma(&["verify", p(&v1)]);
        assert_eq!(code(&o), 1, "flip at {at}");
        assert!(
            (stdout(&o) + &stderr(&o)).contains(what),
            "flip at {at}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
    // Truncations are incomplete archives.
    for cut in [header_len, header_len + 300, good.len() - 1] {
        std::fs::write(&v1, &good[..cut]).unwrap();
        let o = vma(&["verify", p(&v1)]);
        assert_eq!(code(&o), 1, "cut at {cut}");
        let o = vma(&[
            "extract",
            "-q",
            p(&v1),
            p(&t.path().join(format!("o{cut}"))),
        ]);
        assert_eq!(code(&o), 1);
        assert!(!t.path().join(format!("o{cut}/d.raw")).exists());
    }
    // v1 blobs are limited to 65535 bytes.
    let big = t.path().join("big.conf");
    std::fs::write(&big, vec![b'a'; 70_000]).unwrap();
    let o = vma(&[
        "create",
        "-q",
        "--format",
        "vma1",
        p(&t.path().join("x.vma")),
        "--config",
        p(&big),
        p(&disk),
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("65535"), "{}", stderr(&o));
}

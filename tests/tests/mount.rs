//! `vma mount` through real FUSE mounts (root and /dev/fuse required):
//! drive files byte-compared with their sources, an ext4 image checked by
//! e2fsck and read by debugfs through the mount, concurrent readers,
//! SEEK_DATA/SEEK_HOLE, EIO confined to a damaged extent, clean unmounts.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vma_tests::*;

/// Two drives (one sparse with an odd size) and two configs.
fn sample(d: &Path, compress: &str) -> PathBuf {
    let disk = d.join("disk0.raw");
    sparse_image(
        &disk,
        90 * 1024 * 1024 + 777,
        &[
            (0, 300_000, 1),
            (7 << 20, 4096, 2),
            (40 << 20, 3 << 20, 5),
            (90 * 1024 * 1024 - 100, 877, 3),
        ],
    );
    std::fs::write(d.join("efi.raw"), noise(4, 128 * 1024 + 5)).unwrap();
    std::fs::write(d.join("qemu-server.conf"), b"cores: 2\nmemory: 2048\n").unwrap();
    let archive = d.join("backup.vma");
    let o = vma(&[
        "create",
        "--quiet",
        "--compress",
        compress,
        p(&archive),
        "--config",
        p(&d.join("qemu-server.conf")),
        p(&disk),
        p(&d.join("efi.raw")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    archive
}

/// SEEK_DATA or SEEK_HOLE from `offset`, through the real lseek.
fn seek(path: &Path, offset: u64, whence: i32) -> std::io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc_lseek(f.as_raw_fd(), offset as i64, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

extern "C" {
    #[link_name = "lseek"]
    fn libc_lseek(fd: i32, offset: i64, whence: i32) -> i64;
}
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;

#[test]
fn mounted_archive_shows_exact_drives_configs_and_listing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let archive = sample(d, "zstd:1");
    let m = Mounted::new(&archive, &d.join("mnt"), &[]);

    let mut names: Vec<String> = std::fs::read_dir(&m.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["archive.json", "disk0.raw", "efi.raw", "qemu-server.conf"]
    );
    for drive in ["disk0.raw", "efi.raw"] {
        let src = std::fs::read(d.join(drive)).unwrap();
        let seen = std::fs::read(m.path(drive)).unwrap();
        assert_eq!(seen.len(), src.len(), "{drive} size");
        assert!(seen == src, "{drive} differs through the mount");
    }
    assert_eq!(
        std::fs::read(m.path("qemu-server.conf")).unwrap(),
        std::fs::read(d.join("qemu-server.conf")).unwrap()
    );
    let listed: serde_json::Value =
        serde_json::from_slice(&vma(&["list", "--json", p(&archive)]).stdout).unwrap();
    let shown: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path("archive.json")).unwrap()).unwrap();
    assert_eq!(shown, listed);

    // Times come from the archive; everything is read-only.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(m.path("disk0.raw")).unwrap();
    assert_eq!(meta.mtime(), listed["ctime"].as_i64().unwrap());
    assert_eq!(meta.mode() & 0o777, 0o444);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("disk0.raw"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "{err}"); // EROFS
    let err = std::fs::write(m.path("new-file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "{err}");

    // SEEK_DATA / SEEK_HOLE follow the archive's zero runs.
    let disk = m.path("disk0.raw");
    assert_eq!(seek(&disk, 0, SEEK_DATA).unwrap(), 0);
    let hole = seek(&disk, 0, SEEK_HOLE).unwrap();
    assert_eq!(hole, 5 * 65536, "first hole after the 300,000 data bytes");
    assert_eq!(seek(&disk, hole, SEEK_DATA).unwrap(), 7 << 20);
    assert_eq!(
        seek(&disk, (40 << 20) + 5, SEEK_DATA).unwrap(),
        (40 << 20) + 5
    );
    // `cp --sparse=always` keeps holes and copies exactly.
    let copy = d.join("copy.raw");
    let o = sh(&format!("cp --sparse=always {} {}", p(&disk), p(&copy)));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(d.join("disk0.raw")).unwrap());
    assert!(
        allocated(&copy) < 8 << 20,
        "copy allocated {} bytes",
        allocated(&copy)
    );
    // qemu-img reads it in place.
    let o = sh(&format!(
        "qemu-img compare -f raw -F raw {} {}",
        p(&disk),
        p(&d.join("disk0.raw"))
    ));
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));

    m.unmount();
}

#[test]
fn ext4_inside_an_archive_checks_clean_and_reads_through_the_mount() {
    require("debugfs");
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    let hosts = noise(11, 300_000);
    std::fs::write(src.join("etc/data.bin"), &hosts).unwrap();
    std::fs::write(src.join("hello.txt"), b"hello from inside the backup\n").unwrap();
    let disk = d.join("fs.raw");
    let o = sh(&format!(
        "truncate -s 64M {0} && PATH=$PATH:/sbin:/usr/sbin mkfs.ext4 -q -F -d {1} {0}",
        p(&disk),
        p(&src)
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let archive = d.join("fs.vma");
    let o = vma(&["create", "--quiet", p(&archive), p(&disk)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let m = Mounted::new(&archive, &d.join("mnt"), &[]);
    let image = m.path("fs.raw");
    let o = sh(&format!(
        "PATH=$PATH:/sbin:/usr/sbin e2fsck -fn {}",
        p(&image)
    ));
    assert_eq!(code(&o), 0, "e2fsck: {}{}", stdout(&o), stderr(&o));
    for (inside, expect) in [
        ("/etc/data.bin", hosts.clone()),
        ("/hello.txt", b"hello from inside the backup\n".to_vec()),
    ] {
        let o = sh(&format!(
            "PATH=$PATH:/sbin:/usr/sbin debugfs -R 'cat {inside}' {} 2>/dev/null",
            p(&image)
        ));
        assert_eq!(code(&o), 0);
        assert!(
            o.stdout == expect,
            "{inside} read through the mount differs"
        );
    }
    m.unmount();
}

#[test]
fn concurrent_readers_all_see_the_right_bytes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let archive = sample(d, "zstd:3");
    let m = Mounted::new(&archive, &d.join("mnt"), &["--cache-size", "1"]);
    let src = std::sync::Arc::new(std::fs::read(d.join("disk0.raw")).unwrap());
    let handles: Vec<_> = (0..6u64)
        .map(|k| {
            let src = src.clone();
            let path = m.path("disk0.raw");
            std::thread::spawn(move || {
                let f = std::fs::File::open(path).unwrap();
                let mut x = k * 7919 + 1;
                let mut buf = vec![0u8; 300_000];
                for _ in 0..150 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let len = 1 + (x >> 40) as usize % buf.len();
                    let off = (x >> 20) % (src.len() as u64 - len as u64);
                    f.read_exact_at(&mut buf[..len], off).unwrap();
                    assert!(
                        buf[..len] == src[off as usize..off as usize + len],
                        "reader {k} at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    m.unmount();
}

#[test]
fn a_damaged_extent_fails_only_the_reads_that_touch_it() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let archive = sample(d, "none");
    // Damage one byte in the middle of the data (the 3 MiB region at 40 MiB).
    let o = vma(&["verify", "--json", p(&archive)]);
    assert_eq!(code(&o), 0);
    let bytes = std::fs::read(&archive).unwrap();
    let needle = &noise(5, 3 << 20)[1 << 20..(1 << 20) + 64];
    let at = bytes
        .windows(64)
        .position(|w| w == needle)
        .expect("data found in the archive");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&archive)
        .unwrap();
    f.write_all_at(&[bytes[at] ^ 0xff], at as u64).unwrap();
    drop(f);
    let o = vma(&["verify", "--json", p(&archive)]);
    assert_eq!(code(&o), 1);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let damaged: Vec<(u64, u64)> = report["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["drive"] == "disk0")
        .map(|r| (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap()))
        .collect();
    assert!(!damaged.is_empty(), "{report}");

    let log = d.join("mount.log");
    let m = Mounted::new(&archive, &d.join("mnt"), &["--log", p(&log)]);
    let src = std::fs::read(d.join("disk0.raw")).unwrap();
    let f = std::fs::File::open(m.path("disk0.raw")).unwrap();
    let mut buf = vec![0u8; 65536];
    let (mut failed, mut good) = (0, 0);
    let mut off = 0u64;
    while off < src.len() as u64 {
        let len = (src.len() as u64 - off).min(65536) as usize;
        let hits = damaged
            .iter()
            .any(|&(s, e)| off < e && s < off + len as u64);
        match f.read_exact_at(&mut buf[..len], off) {
            Ok(()) => {
                assert!(!hits, "read at {off} touches damage but succeeded");
                assert!(
                    buf[..len] == src[off as usize..off as usize + len],
                    "wrong data at {off}"
                );
                good += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(5), "{e}"); // EIO
                assert!(
                    hits,
                    "read at {off} failed outside the damaged ranges {damaged:?}"
                );
                failed += 1;
            }
        }
        off += len as u64;
    }
    assert!(failed > 0 && good > 1000, "{failed} failed, {good} good");
    drop(f);
    // The other drive is unaffected.
    assert_eq!(
        std::fs::read(m.path("efi.raw")).unwrap(),
        std::fs::read(d.join("efi.raw")).unwrap()
    );
    m.unmount();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("disk0.raw") && logged.contains("EIO") && logged.contains("damaged"),
        "{logged}"
    );
}

#[test]
fn vma1_files_mount_and_bad_requests_fail_before_detaching() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let archive = sample(d, "zstd:1");
    let v1 = d.join("backup-v1.vma");
    let o = vma(&[
        "convert",
        "--quiet",
        "--format",
        "vma1",
        p(&archive),
        p(&v1),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let m = Mounted::new(&v1, &d.join("mnt"), &[]);
    // VMA v1 stores the drive in whole 512-byte sectors (a zero tail).
    let mut sectors = std::fs::read(d.join("disk0.raw")).unwrap();
    sectors.resize(sectors.len().next_multiple_of(512), 0);
    assert!(std::fs::read(m.path("disk0.raw")).unwrap() == sectors);
    m.unmount();

    // A whole-stream compressed v1 is refused with the way out named.
    let o = sh(&format!("zstd -q -c {} > {}.zst", p(&v1), p(&v1)));
    assert_eq!(code(&o), 0);
    std::fs::create_dir_all(d.join("mnt2")).unwrap();
    let o = vma(&["mount", &format!("{}.zst", p(&v1)), p(&d.join("mnt2"))]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("vma convert"), "{}", stderr(&o));
    // Missing mount point, non-empty mount point: errors on the terminal.
    let o = vma(&["mount", p(&archive), p(&d.join("nowhere"))]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("nowhere"), "{}", stderr(&o));
    std::fs::write(d.join("mnt2/file"), b"x").unwrap();
    let o = vma(&["mount", p(&archive), p(&d.join("mnt2"))]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("mnt2"), "{}", stderr(&o));
    assert!(serving_processes(&d.join("mnt2")).is_empty());
}

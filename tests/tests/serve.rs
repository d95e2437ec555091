//! `vma serve`: archives as NBD exports, judged by real peers (qemu-img,
//! qemu-nbd, nbdinfo, nbdcopy).

use std::path::{Path, PathBuf};
use std::process::Command;

use vma_core::format::{RunKind, CLUSTER_SIZE};
use vma_tests::forge::{Archive, ExtentParts};
use vma_tests::served::Served;
use vma_tests::*;

const CS: usize = CLUSTER_SIZE;

use vma_tests::{run_tool as run, tool_ok as ok};

/// An archive of two drives: a sparse one and a small dense one.
fn two_drives(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
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
    let efi = d.join("efi.raw");
    std::fs::write(&efi, noise(15, 256 * 1024 + 5)).unwrap();
    let archive = d.join("backup.vma");
    let o = vma(&["create", "-q", p(&archive), p(&disk), p(&efi)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    (archive, disk, efi)
}

#[test]
fn every_drive_is_served_to_real_peers() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, disk, efi) = two_drives(d);
    let before = sha256_file(&archive);
    let s = Served::start(&archive, &d.join("s.sock"), &[]);

    let list = ok("qemu-nbd", &["--list", "-k", p(&s.socket)]);
    assert!(
        list.contains("export: 'disk0'") && list.contains("export: 'efi'"),
        "{list}"
    );
    assert!(list.contains("base:allocation"), "{list}");

    let info = ok("qemu-img", &["info", "--output=json", &s.url("disk0")]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    // (QEMU rounds sizes up to whole sectors; nbdinfo shows the exact one.)
    assert_eq!(
        info["virtual-size"],
        (24 * 1024 * 1024 + 333u64).next_multiple_of(512)
    );
    let size = ok("nbdinfo", &["--size", &s.url("disk0")]);
    assert_eq!(size.trim(), (24 * 1024 * 1024 + 333).to_string());

    // Block status from the index: the holes of the image are holes.
    let map = ok("nbdinfo", &["--map", "--json", &s.url("disk0")]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let hole_at = |off: u64| {
        map.as_array().unwrap().iter().any(|e| {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            o <= off && off < o + l && e["type"].as_u64() == Some(3)
        })
    };
    assert!(hole_at(2 << 20) && hole_at(20 << 20), "{map}");
    assert!(!hole_at(0) && !hole_at(10 << 20), "{map}");

    for (name, img) in [("disk0", &disk), ("efi", &efi)] {
        ok("qemu-img", &["compare", "-f", "raw", p(img), &s.url(name)]);
        let out = d.join(format!("{name}.convert.raw"));
        ok("qemu-img", &["convert", "-O", "raw", &s.url(name), p(&out)]);
        let (got, want) = (std::fs::read(&out).unwrap(), std::fs::read(img).unwrap());
        assert!(got[..want.len()] == want[..] && got[want.len()..].iter().all(|&b| b == 0));
    }

    // Many connections at once (nbdcopy's own and several clients).
    let copies: Vec<_> = (0..4)
        .map(|i| {
            let url = s.url("disk0");
            let out = d.join(format!("copy{i}.raw"));
            std::thread::spawn(move || {
                ok("nbdcopy", &["--connections=4", &url, p(&out)]);
                out
            })
        })
        .collect();
    let want = std::fs::read(&disk).unwrap();
    for c in copies {
        let out = c.join().unwrap();
        assert!(std::fs::read(&out).unwrap() == want, "nbdcopy copy differs");
    }
    // ... and again, one after the other.
    for _ in 0..3 {
        ok(
            "qemu-img",
            &["compare", "-f", "raw", p(&disk), &s.url("disk0")],
        );
    }

    let socket = s.socket.clone();
    assert_eq!(s.stop(), 0, "SIGTERM ends vma serve cleanly");
    assert!(!socket.exists(), "the socket is removed on exit");
    assert_eq!(sha256_file(&archive), before, "the archive is unchanged");
}

#[test]
fn a_killed_servers_socket_is_replaced_and_a_live_one_is_not() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, disk, _) = two_drives(d);
    let sock = d.join("s.sock");
    let s = Served::start(&archive, &sock, &[]);
    // A second server on the same socket is refused while the first serves.
    let o = vma(&["serve", p(&archive), "--socket", p(&sock)]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("already listens"), "{}", stderr(&o));
    s.kill();
    assert!(sock.exists(), "SIGKILL leaves the socket file");
    let s = Served::start(&archive, &sock, &[]);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", p(&disk), &s.url("disk0")],
    );
    assert_eq!(s.stop(), 0);
}

#[test]
fn a_point_in_the_middle_of_a_chain_is_served() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = d.join("disk.raw");
    let size = 16 * 1024 * 1024;
    sparse_image(&img, size, &[(0, 3 << 20, 1), (8 << 20, 2 << 20, 2)]);
    let full = d.join("full.vma");
    let o = vma(&["create", "-q", p(&full), p(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Point 1: a change and a new region.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(3, 300_000), 1 << 20).unwrap();
    f.write_all_at(&noise(4, 1 << 20), 12 << 20).unwrap();
    let mid_img = d.join("mid.raw");
    std::fs::copy(&img, &mid_img).unwrap();
    let mid = d.join("mid.vma");
    diff_archive(&full, &img, &mid);
    // Point 2 changes more.
    f.write_all_at(&noise(5, 2 << 20), 0).unwrap();
    let newest = d.join("newest.vma");
    diff_archive(&mid, &img, &newest);

    let s = Served::start(&mid, &d.join("s.sock"), &[]);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", p(&mid_img), &s.url("disk")],
    );
    let o = run(
        "qemu-img",
        &["compare", "-f", "raw", p(&img), &s.url("disk")],
    );
    assert_eq!(code(&o), 1, "the newest point differs from the middle one");
    assert_eq!(s.stop(), 0);
    let s = Served::start(&newest, &d.join("s2.sock"), &["--parent", p(&full)]);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", p(&img), &s.url("disk")],
    );
    assert_eq!(s.stop(), 0);
}

#[test]
fn a_vma1_archive_is_served() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = d.join("disk.raw");
    sparse_image(&img, 8 << 20, &[(0, 100_000, 1), (5 << 20, 1 << 20, 2)]);
    let archive = d.join("v1.vma");
    let o = vma(&["create", "-q", "--format", "vma1", p(&archive), p(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let s = Served::start(&archive, &d.join("s.sock"), &[]);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", p(&img), &s.url("disk")],
    );
    assert_eq!(s.stop(), 0);
}

/// One cluster of export `name` read by a real client (`qemu-img
/// convert` of a raw window over the NBD node): its bytes, or None when
/// the read failed.
fn read_cluster(s: &Served, name: &str, cluster: usize, out: &Path) -> Option<Vec<u8>> {
    let _ = std::fs::remove_file(out);
    let src = serde_json::json!({
        "driver": "raw",
        "offset": cluster * CS,
        "size": CS,
        "file": {
            "driver": "nbd",
            "server": {"type": "unix", "path": p(&s.socket)},
            "export": name,
        },
    });
    let o = run(
        "qemu-img",
        &["convert", "-O", "raw", &format!("json:{src}"), p(out)],
    );
    (code(&o) == 0).then(|| std::fs::read(out).unwrap())
}

/// An archive in which another archive's extent (valid digests, same
/// place) was spliced: the archive's own data, and the clusters of the
/// spliced extent.
fn spliced(d: &Path) -> (PathBuf, Vec<u8>, std::ops::Range<usize>) {
    let (a_data, b_data) = (noise(1, 64 * CS), noise(2, 64 * CS));
    let mut made = Vec::new();
    for (name, data) in [("a", &a_data), ("b", &b_data)] {
        let img = d.join(format!("{name}.img"));
        std::fs::write(&img, data).unwrap();
        let archive = d.join(format!("{name}.vma"));
        let o = vma(&[
            "create",
            "-q",
            "--compress",
            "none",
            p(&archive),
            &format!("disk={}", p(&img)),
        ]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        made.push(archive);
    }
    let (mut bytes, other) = (
        std::fs::read(&made[0]).unwrap(),
        std::fs::read(&made[1]).unwrap(),
    );
    assert_eq!(bytes.len(), other.len(), "same layout");
    let table = Archive::parse(&bytes).placed_table();
    let e = table[3];
    let range = e.offset.get() as usize..(e.offset.get() + e.len as u64) as usize;
    bytes[range.clone()].copy_from_slice(&other[range]);
    let spliced = d.join("spliced.vma");
    std::fs::write(&spliced, &bytes).unwrap();
    // Which clusters the extent holds, from its entries.
    let parts = ExtentParts::parse(
        &bytes[e.offset.get() as usize..(e.offset.get() + e.len as u64) as usize],
    );
    let data: Vec<_> = parts
        .entries
        .iter()
        .filter(|x| x.kind == RunKind::Data)
        .collect();
    assert_eq!(data.len(), 1, "one data run in the extent");
    let first = data[0].start as usize;
    (spliced, a_data, first..first + data[0].count as usize)
}

#[test]
fn a_spliced_extent_is_an_error_for_exactly_its_range_never_other_bytes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, data, bad) = spliced(d);
    assert!(!bad.is_empty());
    let s = Served::start(&archive, &d.join("s.sock"), &[]);
    let out = d.join("cluster.raw");
    for c in 0..64 {
        let got = read_cluster(&s, "disk", c, &out);
        if bad.contains(&c) {
            assert!(
                got.is_none(),
                "cluster {c} of the spliced extent was served"
            );
        } else {
            let got = got.unwrap_or_else(|| panic!("cluster {c} (intact) failed"));
            assert!(
                got == data[c * CS..(c + 1) * CS],
                "cluster {c}: wrong bytes"
            );
        }
    }
    // A whole copy fails rather than give anything wrong.
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &s.url("disk"),
            p(&d.join("all.raw")),
        ],
    );
    assert_ne!(code(&o), 0, "qemu-img convert of a damaged drive succeeded");
    assert!(s.messages().contains("--salvage"), "{}", s.messages());
    assert_eq!(s.stop(), 0);

    // --salvage: the spliced range reads as zeros and is reported.
    let s = Served::start(&archive, &d.join("s2.sock"), &["--salvage"]);
    let all = d.join("salvaged.raw");
    ok(
        "qemu-img",
        &["convert", "-O", "raw", &s.url("disk"), p(&all)],
    );
    let got = std::fs::read(&all).unwrap();
    for c in 0..64 {
        let want = if bad.contains(&c) {
            vec![0u8; CS]
        } else {
            data[c * CS..(c + 1) * CS].to_vec()
        };
        assert!(
            got[c * CS..(c + 1) * CS] == want[..],
            "salvaged cluster {c}"
        );
    }
    let msgs = s.messages();
    assert!(
        msgs.contains("served as zeros") || msgs.contains("read as zeros"),
        "{msgs}"
    );
    assert_eq!(s.stop(), 0);
}

#[test]
fn tcp_needs_an_explicit_flag_and_then_serves() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, disk, _) = two_drives(d);
    let o = vma(&["serve", p(&archive), "--tcp", "127.0.0.1:0"]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("--insecure-plain-tcp"),
        "{}",
        stderr(&o)
    );
    let o = vma(&[
        "serve",
        p(&archive),
        "--tcp",
        "127.0.0.1:0",
        "--tls-creds",
        p(d),
    ]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = d.join("tcp.log");
    let mut child = Command::new(vma_bin())
        .args(["serve", p(&archive), "--tcp", &addr, "--insecure-plain-tcp"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log).unwrap().contains("ready;") {
        assert!(start.elapsed().as_secs() < 30, "not ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let url = format!("nbd://{addr}/disk0");
    ok("qemu-img", &["compare", "-f", "raw", p(&disk), &url]);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn detach_and_pid_file() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, disk, _) = two_drives(d);
    let (sock, pid_file) = (d.join("s.sock"), d.join("serve.pid"));
    let o = vma(&[
        "serve",
        p(&archive),
        "--socket",
        p(&sock),
        "--detach",
        "--pid-file",
        p(&pid_file),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("nbd+unix:///disk0"), "{}", stderr(&o));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let url = format!("nbd+unix:///disk0?socket={}", p(&sock));
    ok("qemu-img", &["compare", "-f", "raw", p(&disk), &url]);
    // SAFETY: kill(2) on the process the pid file names (ours).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = std::time::Instant::now();
    while sock.exists() || pid_file.exists() {
        assert!(
            start.elapsed().as_secs() < 30,
            "detached server did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

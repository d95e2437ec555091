//! Memory does not grow with the number of index runs: the peak RSS of
//! every command that reads an archive (list, verify, extract raw and
//! qcow2, convert, merge, checksum, mount while reading) on an archive of
//! 2 M runs stays within a small margin of the same on 200 K runs, and
//! under 256 MiB. (2.0 grew by about 100 bytes per run: 223 MB for verify
//! at 2 M runs.) Not a timed test: times are printed, not checked.

use std::path::Path;

use vma_tests::scale::{measure, sparse_incremental, zeros};
use vma_tests::*;

/// Margin allowed between the two sizes.
const MARGIN_KIB: u64 = 24 * 1024;
/// The bound of issue 14.
const BOUND_KIB: u64 = 256 * 1024;

/// Peak RSS of each command on an archive of `clusters` runs.
fn peaks(dir: &Path, clusters: u64) -> Vec<(String, u64)> {
    std::fs::create_dir_all(dir).unwrap();
    let parent = dir.join("parent.vma");
    let inc = dir.join("inc.vma");
    zeros(&parent, clusters);
    sparse_incremental(&inc, &parent, clusters);
    let a = p(&inc);
    let d = p(dir);
    let mut out = Vec::new();
    for (name, args) in [
        ("list", format!("list {a}")),
        ("verify", format!("verify {a}")),
        (
            "verify (pipe)",
            format!("verify --parent {} - < {a}", p(&parent)),
        ),
        ("extract raw", format!("extract -q {a} {d}/raw")),
        (
            "extract qcow2",
            format!("extract -q --format qcow2 {a} {d}/qcow2"),
        ),
        ("convert", format!("convert -q {a} {d}/converted.out")),
        ("merge", format!("merge -q {a} -o {d}/merged.out")),
        ("checksum", format!("checksum -q {a}")),
    ] {
        let (rss, took, status, text) = measure(&args);
        assert_eq!(status, 0, "vma {args}: {text}");
        eprintln!(
            "{clusters} runs: {name}: {rss} KiB, {:.1} s",
            took.as_secs_f64()
        );
        out.push((name.to_string(), rss));
    }
    // A mount's extent cache is its own bound (64 MiB by default): a small
    // one shows what else grows; the default one stays under the bound.
    out.push((
        "mount (reading, --cache-size 8)".into(),
        mount_peak(&inc, &dir.join("mnt"), clusters, "8"),
    ));
    let default_cache = mount_peak(&inc, &dir.join("mnt"), clusters, "64");
    assert!(default_cache <= BOUND_KIB, "mount: {default_cache} KiB");
    std::fs::remove_dir_all(dir).unwrap();
    out
}

/// Peak RSS of a foreground mount while a spread of the drive is read.
fn mount_peak(archive: &Path, mp: &Path, clusters: u64, cache_mib: &str) -> u64 {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(mp).unwrap();
    let mut child = std::process::Command::new(vma_bin())
        .args([
            "mount",
            "--foreground",
            "--cache-size",
            cache_mib,
            p(archive),
            p(mp),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut tries = 0;
    while !is_mount_point(mp) {
        tries += 1;
        assert!(tries < 600, "the mount did not come up");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let f = std::fs::File::open(mp.join("disk.raw")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let size = clusters * 65536;
    for i in 0..512u64 {
        let at = (size / 512 * i) & !0xffff;
        f.read_exact_at(&mut buf[..(size - at).min(1 << 20) as usize], at)
            .unwrap();
    }
    drop(f);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let o = vma(&["umount", p(mp)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    child.wait().unwrap();
    eprintln!("{clusters} runs: mount (reading, --cache-size {cache_mib}): {hwm} KiB");
    hwm
}

#[test]
fn memory_does_not_grow_with_index_runs() {
    require("/usr/bin/time");
    let t = tempfile::tempdir().unwrap();
    let small = peaks(&t.path().join("small"), 200_000);
    let large = peaks(&t.path().join("large"), 2_000_000);
    for ((name, s), (_, l)) in small.iter().zip(&large) {
        assert!(
            *l <= s + MARGIN_KIB,
            "{name}: {l} KiB at 2 M runs, {s} KiB at 200 K runs: memory grows with runs"
        );
        assert!(*l <= BOUND_KIB, "{name}: {l} KiB at 2 M runs");
    }
}

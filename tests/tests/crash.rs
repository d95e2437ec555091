//! Crash safety: every command that writes files is killed with SIGKILL at
//! random moments, and never leaves a file under its final name that is
//! not complete; a full file system (a small tmpfs) is reported clearly
//! and leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vma_tests::*;

/// Kills per command (`VMA_CRASH_KILLS` overrides, for longer runs).
fn kills() -> usize {
    std::env::var("VMA_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// A 40 MiB disk with incompressible data spread over it, and a second
/// disk: the same with some clusters changed (for diff and merge).
fn disks(d: &Path) -> (PathBuf, PathBuf) {
    let disk = d.join("disk.raw");
    let regions: Vec<(u64, usize, u64)> =
        (0..20).map(|i| (i * (2 << 20), 1 << 20, 100 + i)).collect();
    sparse_image(&disk, 40 << 20, &regions);
    let newer = d.join("newer").join("disk.raw");
    std::fs::create_dir_all(newer.parent().unwrap()).unwrap();
    std::fs::copy(&disk, &newer).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newer)
        .unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..10u64 {
        f.write_all_at(&noise(900 + i, 65536), i * (4 << 20) + 65536)
            .unwrap();
    }
    (disk, newer)
}

/// xorshift for kill times; the seed is printed so a failure can be repeated.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Run `args` once to completion (timing it), then [`kills`] times killed
/// after a random delay within that time. After each run `check` judges
/// what is under the final names (it must accept a missing file and a
/// complete one, and fail on anything else); `reset` removes outputs.
/// Returns how many runs were cut short.
fn kill_loop(
    what: &str,
    args: &[&str],
    dice: &mut Dice,
    reset: &dyn Fn(),
    check: &dyn Fn(&str),
) -> usize {
    reset();
    let start = Instant::now();
    let o = vma(args);
    assert_eq!(code(&o), 0, "{what}: {}", stderr(&o));
    let full = start.elapsed();
    check(&format!("{what}, uninterrupted"));
    let mut cut_short = 0;
    for round in 0..kills() {
        reset();
        let delay = Duration::from_micros(dice.below(full.as_micros() as u64 + 1));
        let mut child = Command::new(vma_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        if !finished {
            cut_short += 1;
        }
        check(&format!("{what}, killed after {delay:?} (round {round})"));
    }
    eprintln!(
        "{what}: {cut_short} of {} runs killed before they finished ({full:?} uninterrupted)",
        kills()
    );
    cut_short
}

/// A file under a final archive name must verify.
fn archive_absent_or_complete(path: &Path, ctx: &str) {
    if path.exists() {
        let o = vma(&["verify", "--quiet", p(path)]);
        assert_eq!(
            code(&o),
            0,
            "{ctx}: {} exists but does not verify: {}",
            path.display(),
            stdout(&o)
        );
    }
}

/// Remove every entry of `dir` whose name starts with `prefix`, partial
/// files of killed runs included.
fn remove_outputs(dir: &Path, prefix: &str) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) || name.starts_with(&format!(".{prefix}")) {
            let path = e.path();
            if path.is_dir() {
                std::fs::remove_dir_all(path).unwrap();
            } else {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
}

#[test]
fn killed_writers_never_leave_an_incomplete_file_under_the_final_name() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (disk, newer) = disks(d);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill times seeded with {seed}");
    let mut dice = Dice(seed);
    let mut cut_short = 0;

    // Inputs made once: a full archive and an incremental one.
    let full = d.join("full.vma");
    assert_eq!(code(&vma(&["create", "--quiet", p(&full), p(&disk)])), 0);
    let inc = d.join("inc.vma");
    diff_archive(&full, &newer, &inc);

    let out = d.join("out.vma");
    let reset = || remove_outputs(d, "out");
    let check = |ctx: &str| archive_absent_or_complete(&out, ctx);
    let (full_s, inc_s, out_s) = (p(&full), p(&inc), p(&out));
    let writers: [(&str, Vec<&str>); 5] = [
        ("create", vec!["create", "--quiet", out_s, p(&disk)]),
        (
            "create --format vma1",
            vec!["create", "--quiet", "--format", "vma1", out_s, p(&disk)],
        ),
        (
            "convert",
            vec!["convert", "--quiet", "--format", "vma1", full_s, out_s],
        ),
        ("merge", vec!["merge", "--quiet", inc_s, "-o", out_s]),
        // diff writes an incremental archive: verify finds its parent beside it.
        (
            "diff",
            vec![
                "diff",
                "--quiet",
                "--against",
                full_s,
                p(&newer),
                "-o",
                out_s,
            ],
        ),
    ];
    for (what, args) in &writers {
        cut_short += kill_loop(what, args, &mut dice, &reset, &check);
    }

    let src = std::fs::read(&disk).unwrap();
    let dir = d.join("out-dir");
    let reset_dir = || {
        let _ = std::fs::remove_dir_all(&dir);
    };
    let raw_ok = |ctx: &str| {
        let f = dir.join("disk.raw");
        if f.exists() {
            assert!(
                std::fs::read(&f).unwrap() == src,
                "{ctx}: disk.raw is incomplete"
            );
        }
    };
    cut_short += kill_loop(
        "extract",
        &["extract", "--quiet", p(&full), p(&dir)],
        &mut dice,
        &reset_dir,
        &raw_ok,
    );
    let qcow2_ok = |ctx: &str| {
        let f = dir.join("disk.qcow2");
        if f.exists() {
            let o = sh(&format!("qemu-img compare -q {} {}", p(&f), p(&disk)));
            assert_eq!(code(&o), 0, "{ctx}: disk.qcow2 differs: {}", stderr(&o));
        }
    };
    require("qemu-img");
    cut_short += kill_loop(
        "extract --format qcow2",
        &["extract", "--quiet", "--format", "qcow2", p(&full), p(&dir)],
        &mut dice,
        &reset_dir,
        &qcow2_ok,
    );
    // The loop must really have cut runs short, or it proved nothing.
    assert!(
        cut_short >= kills() * 7 / 2,
        "only {cut_short} runs were killed before finishing"
    );
}

#[test]
fn a_full_file_system_is_reported_and_cleaned_up() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (disk, newer) = disks(d);
    let full = d.join("full.vma");
    assert_eq!(
        code(&vma(&[
            "create",
            "--quiet",
            "--compress",
            "none",
            p(&full),
            p(&disk)
        ])),
        0
    );
    let inc = d.join("inc.vma");
    diff_archive(&full, &newer, &inc);
    // 8 MiB of room for 20 MiB of incompressible data.
    let fs = SmallFs::new(&d.join("small"), "8m");
    let target = fs.path().join("out.vma");
    let drive = fs.path().join("disk.raw");
    // A drive the parent lacks is stored in full.
    let new_drive = format!("other={}", p(&disk));
    let qcow2 = fs.path().join("disk.qcow2");
    // Each with the file whose write failed, which the message must name.
    let cases: Vec<(&str, Vec<&str>, &Path)> = vec![
        (
            "create",
            vec!["create", "--compress", "none", p(&target), p(&disk)],
            &target,
        ),
        (
            "create --format vma1",
            vec!["create", "--format", "vma1", p(&target), p(&disk)],
            &target,
        ),
        ("convert", vec!["convert", p(&full), p(&target)], &target),
        ("merge", vec!["merge", p(&inc), "-o", p(&target)], &target),
        (
            "diff",
            vec![
                "diff",
                "--compress",
                "none",
                "--against",
                p(&inc),
                &new_drive,
                "-o",
                p(&target),
            ],
            &target,
        ),
        // extract checks free space up front (tests/tests/edges.rs); told
        // not to, it must still fail cleanly when the disk fills.
        (
            "extract",
            vec!["extract", "--no-space-check", p(&full), p(fs.path())],
            &drive,
        ),
        (
            "extract --format qcow2",
            vec![
                "extract",
                "--no-space-check",
                "--format",
                "qcow2",
                p(&full),
                p(fs.path()),
            ],
            &qcow2,
        ),
    ];
    for (what, args, file) in cases {
        let o = vma(&args);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{what} on a full file system: {err}");
        assert!(
            err.contains("No space left on device"),
            "{what}: the message does not say the disk is full: {err}"
        );
        assert!(
            err.contains(p(file)),
            "{what}: the message does not name {}: {err}",
            file.display()
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(
            fs.entries(),
            Vec::<String>::new(),
            "{what} left files behind on the full file system"
        );
    }
}

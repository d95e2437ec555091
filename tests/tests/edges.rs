//! The edges where a guest or a race could make `vma` lie with exit 0:
//! sources whose bytes a guest wrote are never interpreted (no format
//! probing, backing files only where allowed and only regular files,
//! nothing blocks in `open()`), and outputs never replace an existing name
//! without `--force`, also under a race, `extract` commits all files or
//! none, signals and killed runs leave no temporaries behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vma_tests::*;

/// Run `vma ARGS`, failing the test (not hanging it) when it takes longer
/// than `limit`.
fn vma_within(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(vma_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running vma");
    finish_within(child, limit, &args.join(" "))
}

fn finish_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vma {what} still ran after {limit:?} (blocked?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Names in `dir` of our temporary files (`.NAME.partial-PID`).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.starts_with('.') && (n.contains(".partial-") || n.contains(".replaced-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A pid that no process has: a child that exited and was reaped.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let id = c.id();
    c.wait().unwrap();
    id
}

/// A 4 MiB raw disk whose first bytes are a valid qcow2 image (as QEMU's
/// probing sees it) naming `/etc/shadow` as its raw backing file, as a
/// guest can write into its own disk; the rest is noise.
fn raw_disk_with_qcow2_header(dir: &Path) -> PathBuf {
    require("qemu-img");
    let header = dir.join("header.qcow2");
    let o = sh(&format!(
        "qemu-img create -q -f qcow2 -u -b /etc/shadow -F raw {} 4M",
        p(&header)
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut disk = noise(77, 4 << 20);
    let h = std::fs::read(&header).unwrap();
    disk[..h.len()].copy_from_slice(&h);
    let path = dir.join("disk.raw");
    std::fs::write(&path, &disk).unwrap();
    std::fs::remove_file(&header).unwrap();
    // QEMU's format probing takes it for a qcow2 image over /etc/shadow.
    let o = sh(&format!("qemu-img info {}", p(&path)));
    let info = stdout(&o);
    assert!(
        info.contains("file format: qcow2") && info.contains("/etc/shadow"),
        "{info}"
    );
    path
}

/// `create` from `source` (drive `disk`), `extract`, and the restored
/// drive must be the source's bytes exactly.
fn archived_exactly(dir: &Path, source: &Path, expected: &[u8], tag: &str) {
    let archive = dir.join(format!("{tag}.vma"));
    let o = vma_within(
        &["create", p(&archive), &format!("disk={}", p(source))],
        Duration::from_secs(60),
    );
    assert_eq!(code(&o), 0, "{tag}: {}", stderr(&o));
    let warning = stderr(&o);
    let out = dir.join(format!("{tag}-out"));
    let o = vma(&["extract", "--quiet", p(&archive), p(&out)]);
    assert_eq!(code(&o), 0, "{tag}: {}", stderr(&o));
    let restored = std::fs::read(out.join("disk.raw")).unwrap();
    assert!(
        restored == expected,
        "{tag}: the archive does not hold the disk's bytes"
    );
    assert!(
        warning.contains("starts with a qcow2 header but is archived as raw"),
        "{tag}: no warning: {warning}"
    );
}

#[test]
fn a_raw_disk_with_a_qcow2_header_is_archived_as_its_bytes() {
    let t = tempfile::tempdir().unwrap();
    let disk = raw_disk_with_qcow2_header(t.path());
    let bytes = std::fs::read(&disk).unwrap();
    archived_exactly(t.path(), &disk, &bytes, "file");
}

#[test]
fn a_raw_block_device_with_a_qcow2_header_is_archived_as_its_bytes() {
    let t = tempfile::tempdir().unwrap();
    let disk = raw_disk_with_qcow2_header(t.path());
    let bytes = std::fs::read(&disk).unwrap();
    let dev = LoopDevice::attach(&disk, true);
    archived_exactly(t.path(), dev.path(), &bytes, "loop");
}

#[test]
fn the_format_of_a_source_is_the_users_or_its_names_never_its_contents() {
    require("qemu-img");
    require("qemu-io");
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let o = sh(&format!(
        "cd {} && qemu-img create -q -f qcow2 real.qcow2 8M && \
         qemu-io -f qcow2 -c 'write -P 0x5a 1M 64k' real.qcow2 >/dev/null && \
         cp real.qcow2 real.img && qemu-img convert -O raw real.qcow2 real.ref && \
         head -c 1M /dev/urandom > notqcow.qcow2",
        p(d)
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let extracted = |archive: &Path, drive: &str| {
        let out = d.join(format!(
            "{}-out",
            archive.file_name().unwrap().to_string_lossy()
        ));
        let o = vma(&["extract", "--quiet", p(archive), p(&out)]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        std::fs::read(out.join(format!("{drive}.raw"))).unwrap()
    };
    let reference = std::fs::read(d.join("real.ref")).unwrap();
    // Named *.qcow2: read as qcow2.
    let a = d.join("a.vma");
    let o = vma(&["create", "--quiet", p(&a), p(&d.join("real.qcow2"))]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(extracted(&a, "real") == reference);
    // The same image under another name: its bytes, with a warning ...
    let b = d.join("b.vma");
    let o = vma(&["create", p(&b), p(&d.join("real.img"))]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(extracted(&b, "real") == std::fs::read(d.join("real.img")).unwrap());
    assert!(stderr(&o).contains("format=qcow2:"), "{}", stderr(&o));
    // ... unless the user says it is qcow2 (with a name, too).
    let c = d.join("c.vma");
    let arg = format!("format=qcow2:drive-scsi0={}", p(&d.join("real.img")));
    let o = vma(&["create", "--quiet", p(&c), &arg]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(extracted(&c, "drive-scsi0") == reference);
    // A file named *.qcow2 that is not one is refused, with the way out.
    let o = vma(&["create", p(&d.join("x.vma")), p(&d.join("notqcow.qcow2"))]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("format=raw:"), "{}", stderr(&o));
    assert!(!d.join("x.vma").exists());
    let arg = format!("format=raw:{}", p(&d.join("notqcow.qcow2")));
    let e = d.join("e.vma");
    let o = vma(&["create", "--quiet", p(&e), &arg]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(extracted(&e, "notqcow") == std::fs::read(d.join("notqcow.qcow2")).unwrap());
    // Unknown formats are a usage error.
    let arg = format!("format=vmdk:{}", p(&d.join("real.img")));
    let o = vma(&["create", p(&d.join("y.vma")), &arg]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("unknown image format"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_source_that_is_a_fifo_is_refused_without_blocking() {
    let t = tempfile::tempdir().unwrap();
    let fifo = t.path().join("disk.raw");
    let o = sh(&format!("mkfifo {}", p(&fifo)));
    assert_eq!(code(&o), 0);
    let archive = t.path().join("a.vma");
    let o = vma_within(&["create", p(&archive), p(&fifo)], Duration::from_secs(20));
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("pipe (FIFO)"), "{}", stderr(&o));
    assert!(!archive.exists());
}

/// Rewrite the backing file format extension of the qcow2 image at `path`
/// into an unknown extension: an image that names its backing file
/// without a format (as images made before QEMU required one do).
fn drop_backing_format(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let magic = 0xe279_2acau32.to_be_bytes();
    let at = b
        .windows(4)
        .position(|w| w == magic)
        .expect("a backing format extension");
    b[at..at + 4].copy_from_slice(&0x7777_7777u32.to_be_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn backing_files_are_followed_only_where_allowed_and_only_to_regular_files() {
    require("qemu-img");
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let images = d.join("images");
    let other = d.join("other");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("base.raw"), noise(5, 1 << 20)).unwrap();
    std::fs::write(images.join("base.raw"), noise(6, 1 << 20)).unwrap();
    std::os::unix::fs::symlink(other.join("base.raw"), images.join("link.raw")).unwrap();
    let fifo = images.join("fifo.raw");
    assert_eq!(code(&sh(&format!("mkfifo {}", p(&fifo)))), 0);
    // Device nodes inside the allowed directory: never read.
    assert_eq!(
        code(&sh(&format!("mknod {} c 1 3", p(&images.join("null.raw"))))),
        0
    );
    assert_eq!(
        code(&sh(&format!("mknod {} b 7 0", p(&images.join("blk.raw"))))),
        0
    );
    let overlay = |name: &str, backing: &str, fmt: &str| {
        let o = sh(&format!(
            "cd {} && qemu-img create -q -f qcow2 -u -b {backing} -F {fmt} {name} 1M",
            p(&images)
        ));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        images.join(name)
    };
    let cases = [
        (
            overlay("abs.qcow2", p(&other.join("base.raw")), "raw"),
            "outside",
        ),
        (overlay("up.qcow2", "../other/base.raw", "raw"), "outside"),
        (overlay("link.qcow2", "link.raw", "raw"), "outside"),
        (overlay("shadow.qcow2", "/etc/shadow", "raw"), "outside"),
        (overlay("mem.qcow2", "/proc/self/mem", "raw"), "outside"),
        (overlay("fifo.qcow2", "fifo.raw", "raw"), "pipe (FIFO)"),
        (overlay("null.qcow2", "null.raw", "raw"), "character device"),
        (overlay("blk.qcow2", "blk.raw", "raw"), "block device"),
        (
            {
                let p = overlay("noformat.qcow2", "base.raw", "raw");
                drop_backing_format(&p);
                p
            },
            "without its format",
        ),
    ];
    for (image, expect) in &cases {
        let archive = d.join("x.vma");
        let o = vma_within(&["create", p(&archive), p(image)], Duration::from_secs(20));
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{}: {err}", image.display());
        assert!(
            err.contains(expect),
            "{}: {expect:?} not said: {err}",
            image.display()
        );
        assert!(!archive.exists());
    }
    // The format-less one says how to record the format.
    let o = vma(&[
        "create",
        p(&d.join("x.vma")),
        p(&images.join("noformat.qcow2")),
    ]);
    assert!(
        stderr(&o).contains("qemu-img rebase -u -F"),
        "{}",
        stderr(&o)
    );
    // A backing file inside the image's directory is read ...
    let inside = overlay("inside.qcow2", "base.raw", "raw");
    let extract_first = |archive: &Path, args: &[&str]| -> Vec<u8> {
        let mut all = vec!["create", "--quiet", "--force", p(archive)];
        all.extend_from_slice(args);
        let o = vma(&all);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let out = d.join("out");
        let _ = std::fs::remove_dir_all(&out);
        let o = vma(&["extract", "--quiet", p(archive), p(&out)]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        std::fs::read(out.join("disk.raw")).unwrap()
    };
    let a = d.join("a.vma");
    let restored = extract_first(&a, &[&format!("disk={}", p(&inside))]);
    assert!(restored == noise(6, 1 << 20));
    // ... and those elsewhere once their directory is allowed.
    for name in ["abs.qcow2", "up.qcow2", "link.qcow2"] {
        let arg = format!("disk={}", p(&images.join(name)));
        let restored = extract_first(&a, &["--allow-backing", p(&other), &arg]);
        assert!(restored == noise(5, 1 << 20), "{name}");
    }
}

/// `n` pairs of the same command started together: never both exit 0;
/// the one that fails says the name exists. `reset` runs before each pair,
/// `check` after it.
fn race(n: usize, args: &[&str], reset: &dyn Fn(), check: &dyn Fn()) {
    for round in 0..n {
        reset();
        let spawn = || {
            Command::new(vma_bin())
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let ok = [&a, &b].iter().filter(|o| code(o) == 0).count();
        assert_eq!(
            ok,
            1,
            "round {round}: {ok} of two `vma {}` succeeded: {} / {}",
            args.join(" "),
            stderr(&a),
            stderr(&b)
        );
        let loser = if code(&a) == 0 { &b } else { &a };
        assert_eq!(code(loser), 2, "{}", stderr(loser));
        assert!(
            stderr(loser).contains("exists; use --force to replace it"),
            "round {round}: {}",
            stderr(loser)
        );
        check();
    }
}

/// A disk, a config and an archive of them (`out.vma`, not yet written).
fn race_inputs(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let disk = d.join("disk.raw");
    sparse_image(&disk, 24 << 20, &[(0, 12 << 20, 1), (16 << 20, 4 << 20, 2)]);
    let conf = d.join("qemu-server.conf");
    std::fs::write(&conf, b"memory: 512\n").unwrap();
    (disk, conf, d.join("out.vma"))
}

#[test]
fn two_creates_racing_to_one_new_name_never_both_succeed() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (disk, conf, out) = race_inputs(d);
    race(
        12,
        &["create", "--quiet", p(&out), "--config", p(&conf), p(&disk)],
        &|| {
            let _ = std::fs::remove_file(&out);
        },
        &|| {
            let o = vma(&["verify", "--quiet", p(&out)]);
            assert_eq!(code(&o), 0, "{}", stdout(&o));
            assert_eq!(temporaries(d), Vec::<String>::new());
        },
    );
}

#[test]
fn two_extracts_racing_to_one_new_directory_never_both_succeed() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (disk, conf, out) = race_inputs(d);
    let o = vma(&["create", "--quiet", p(&out), "--config", p(&conf), p(&disk)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let target = d.join("restore");
    let src = std::fs::read(&disk).unwrap();
    race(
        12,
        &["extract", "--quiet", p(&out), p(&target)],
        &|| {
            let _ = std::fs::remove_dir_all(&target);
        },
        &|| {
            assert!(std::fs::read(target.join("disk.raw")).unwrap() == src);
            assert_eq!(
                std::fs::read(target.join("qemu-server.conf")).unwrap(),
                b"memory: 512\n"
            );
            assert_eq!(temporaries(&target), Vec::<String>::new());
        },
    );
}

#[test]
fn extract_force_that_fails_on_a_drive_leaves_the_old_files() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let make = |name: &str, conf: &[u8], seed: u64| {
        let disk = d.join("disk.raw");
        sparse_image(&disk, 4 << 20, &[(0, 1 << 20, seed)]);
        let c = d.join("qemu-server.conf");
        std::fs::write(&c, conf).unwrap();
        let fw = d.join("fw");
        std::fs::write(&fw, conf).unwrap();
        let archive = d.join(name);
        let o = vma(&[
            "create",
            "--quiet",
            p(&archive),
            "--config",
            p(&c),
            "--config",
            &format!("firewall.fw={}", p(&fw)),
            &format!("a={}", p(&disk)),
            &format!("b={}", p(&disk)),
        ]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        archive
    };
    let old = make("old.vma", b"old config\n", 1);
    let new = make("new.vma", b"new config\n", 2);
    let target = d.join("restore");
    let o = vma(&["extract", "--quiet", p(&old), p(&target)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = |n: &str| std::fs::read(target.join(n)).unwrap();
    let (conf, fw, a) = (
        before("qemu-server.conf"),
        before("firewall.fw"),
        before("a.raw"),
    );
    // The second drive's name is taken by a directory, which is never replaced.
    std::fs::remove_file(target.join("b.raw")).unwrap();
    std::fs::create_dir(target.join("b.raw")).unwrap();
    std::fs::write(target.join("b.raw").join("keep"), b"x").unwrap();
    let o = vma(&["extract", "--force", p(&new), p(&target)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("b.raw"), "{}", stderr(&o));
    assert_eq!(before("qemu-server.conf"), conf, "a config was replaced");
    assert_eq!(before("firewall.fw"), fw, "a config was replaced");
    assert!(before("a.raw") == a, "a drive was replaced");
    assert!(target.join("b.raw").join("keep").exists());
    assert_eq!(temporaries(&target), Vec::<String>::new());
    // Without the obstacle, every file is replaced.
    std::fs::remove_dir_all(target.join("b.raw")).unwrap();
    std::fs::write(target.join("b.raw"), b"old b").unwrap();
    let o = vma(&["extract", "--quiet", "--force", p(&new), p(&target)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(before("qemu-server.conf"), b"new config\n");
    assert!(before("b.raw") == before("a.raw") && before("a.raw") != a);
    assert_eq!(temporaries(&target), Vec::<String>::new());
}

/// Wait until `dir` holds a temporary file, while `child` runs.
fn wait_for_temporary(child: &mut Child, dir: &Path) {
    let start = Instant::now();
    while temporaries(dir).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "vma ended before it wrote anything"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no temporary file appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid touches no memory.
    unsafe { libc::kill(child.id() as i32, sig) };
}

#[test]
fn signals_during_create_and_extract_remove_the_temporaries() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let disk = d.join("disk.raw");
    std::fs::write(&disk, noise(9, 48 << 20)).unwrap();
    let archive = d.join("full.vma");
    let o = vma(&[
        "create",
        "--quiet",
        "--compress",
        "none",
        p(&archive),
        p(&disk),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let bytes = std::fs::read(&archive).unwrap();
    for (sig, name) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        // create: slow compression of incompressible data.
        let out_dir = d.join(format!("create-{name}"));
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("out.vma");
        let mut child = Command::new(vma_bin())
            .args([
                "create",
                "--quiet",
                "--compress",
                "zstd:19",
                p(&out),
                p(&disk),
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_temporary(&mut child, &out_dir);
        signal(&child, sig);
        let o = finish_within(child, Duration::from_secs(20), "create");
        assert_eq!(code(&o), 128 + sig, "create, {name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("interrupted by {name}")),
            "{}",
            stderr(&o)
        );
        assert_eq!(
            temporaries(&out_dir),
            Vec::<String>::new(),
            "create, {name}"
        );
        assert!(!out.exists());

        // extract: from a pipe that stops half way.
        let target = d.join(format!("extract-{name}"));
        let mut child = Command::new(vma_bin())
            .args(["extract", "--quiet", "-", p(&target)])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&bytes[..bytes.len() / 2]).unwrap();
        wait_for_temporary(&mut child, &target);
        signal(&child, sig);
        let o = finish_within(child, Duration::from_secs(20), "extract");
        drop(stdin);
        assert_eq!(code(&o), 128 + sig, "extract, {name}: {}", stderr(&o));
        assert_eq!(
            temporaries(&target),
            Vec::<String>::new(),
            "extract, {name}"
        );
        assert!(!target.join("disk.raw").exists());
    }
}

#[test]
fn stale_temporaries_of_gone_processes_are_removed_by_the_next_run() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let disk = d.join("disk.raw");
    sparse_image(&disk, 2 << 20, &[(0, 1 << 20, 3)]);
    let gone = dead_pid();
    let live = std::process::id();
    let stale = d.join(format!(".old.vma.partial-{gone}"));
    std::fs::write(&stale, noise(1, 100_000)).unwrap();
    // A live process's temporary, and a file that only looks like one.
    let running = d.join(format!(".other.vma.partial-{live}"));
    std::fs::write(&running, b"being written").unwrap();
    let visible = d.join(format!("old.vma.partial-{gone}"));
    std::fs::write(&visible, b"not ours").unwrap();
    let o = vma(&["create", "--quiet", p(&d.join("new.vma")), p(&disk)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stale.exists(), "the stale temporary is still there");
    assert!(
        stderr(&o).contains(p(&stale)) && stderr(&o).contains(&format!("process {gone}")),
        "not said: {}",
        stderr(&o)
    );
    assert!(running.exists() && visible.exists());

    // extract removes them in its target directory.
    let target = d.join("restore");
    std::fs::create_dir(&target).unwrap();
    let stale = target.join(format!(".disk.raw.partial-{gone}"));
    std::fs::write(&stale, b"half a drive").unwrap();
    let o = vma(&["extract", "--quiet", p(&d.join("new.vma")), p(&target)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stale.exists(), "the stale temporary is still there");
    assert!(stderr(&o).contains(p(&stale)), "{}", stderr(&o));
    assert!(target.join("disk.raw").exists());
}

/// SIGINT during `extract` into a new directory (two levels made by the
/// run) from a pipe that stops half way leaves nothing: no temporaries,
/// no directories; into an existing directory, the directory stays, empty.
#[test]
fn interrupted_extract_removes_the_directories_it_made() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let disk = d.join("disk.raw");
    std::fs::write(&disk, noise(5, 8 << 20)).unwrap();
    std::fs::write(d.join("vm.conf"), "memory: 512\n").unwrap();
    let archive = d.join("a.vma");
    let o = vma(&[
        "create",
        "--quiet",
        "--compress",
        "none",
        "--config",
        &format!("qemu-server.conf={}", p(&d.join("vm.conf"))),
        p(&archive),
        p(&disk),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let bytes = std::fs::read(&archive).unwrap();
    let existing = d.join("existing");
    std::fs::create_dir(&existing).unwrap();
    for (target, made) in [
        (d.join("new/restore"), Some(d.join("new"))),
        (existing.clone(), None),
    ] {
        let mut child = Command::new(vma_bin())
            .args(["extract", "--quiet", "-", p(&target)])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&bytes[..bytes.len() / 2]).unwrap();
        wait_for_temporary(&mut child, &target);
        signal(&child, libc::SIGINT);
        let o = finish_within(child, Duration::from_secs(20), "extract");
        drop(stdin);
        assert_eq!(code(&o), 128 + libc::SIGINT, "{}", stderr(&o));
        match made {
            Some(made) => {
                assert!(
                    !made.exists(),
                    "{} is left behind: {}",
                    made.display(),
                    stderr(&o)
                );
                assert!(
                    stderr(&o).contains(&format!("removed {}, which this run made", p(&made))),
                    "{}",
                    stderr(&o)
                );
            }
            None => assert_eq!(
                std::fs::read_dir(&target).unwrap().count(),
                0,
                "{}",
                stderr(&o)
            ),
        }
    }
}

/// `extract` of a full native archive file into a directory whose file
/// system cannot hold the data the index records is refused up front,
/// naming the bytes needed and free and `--no-space-check`, and leaves
/// nothing behind; a sparse drive whose data fits is extracted; with
/// `--no-space-check` the run fails on the full disk and removes what it
/// wrote.
#[test]
fn native_extract_checks_free_space_from_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sparse = d.join("sparse.raw");
    sparse_image(&sparse, 16 << 20, &[(0, 1 << 20, 31)]);
    let full = d.join("full.raw");
    std::fs::write(&full, noise(32, 12 << 20)).unwrap();
    for (name, src) in [("S.vma", &sparse), ("F.vma", &full)] {
        let o = Command::new(vma_bin())
            .args(["create", "--compress", "none", name])
            .arg(format!("disk={}", p(src)))
            .current_dir(d)
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    let fs = SmallFs::new(&d.join("small"), "8m");
    let extract = |args: &[&str]| -> Output {
        Command::new(vma_bin())
            .arg("extract")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap()
    };
    let out = fs.path().join("f/out");
    let o = extract(&["F.vma", p(&out)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("not enough free space in")
            && err.contains("(12582912 bytes, from the archive's index)")
            && err.contains("--no-space-check"),
        "{err}"
    );
    assert!(fs.entries().is_empty(), "{:?}", fs.entries());
    // The same for qcow2 output (its tables on top).
    let o = extract(&["--format", "qcow2", "F.vma", p(&out)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not enough free space in"),
        "{}",
        stderr(&o)
    );
    assert!(fs.entries().is_empty(), "{:?}", fs.entries());
    // A 16 MiB drive holding 1 MiB of data fits.
    let s = fs.path().join("s");
    let o = extract(&["S.vma", p(&s)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::read(s.join("disk.raw")).unwrap(),
        std::fs::read(&sparse).unwrap()
    );
    std::fs::remove_dir_all(&s).unwrap();
    // Told not to check: it runs out of space, fails, and cleans up.
    let o = extract(&["--no-space-check", "F.vma", p(&out)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("No space left"), "{}", stderr(&o));
    assert!(fs.entries().is_empty(), "{:?}", fs.entries());
}

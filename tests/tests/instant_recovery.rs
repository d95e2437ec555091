//! Instant recovery: a VM runs from `vma serve` through a local qcow2
//! overlay (the archive never changes), and `vma live-restore` copies its
//! drive to a target while it runs, then drops the overlay and the NBD node.
//! QEMU 10 judges it: a stopped VM written through the human monitor's
//! `qemu-io` (fast, and the failure modes), and a real guest booted from
//! the archive (ext4, files checked and written, restore under its feet).

use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vma_capture::qmp::{HumanMonitorCommand, Qmp, QueryBlock, QueryNamedBlockNodes, Quit};
use vma_tests::guest::{default_timeout, Guest, GuestConfig};
use vma_tests::served::Served;
use vma_tests::*;

/// Whether QEMU's system emulator runs here at all; when it does not, the
/// tests that need it say so loudly and skip.
fn qemu_runs(test: &str) -> bool {
    let runs = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        eprintln!(
            "\n*** SKIPPED {test}: qemu-system-x86_64 cannot run on this machine \
             (scripts/setup.sh installs it from bookworm-backports) ***\n"
        );
    }
    runs
}

fn ok(cmd: &str, args: &[&str]) -> String {
    require(cmd);
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img create` of a qcow2 overlay whose backing file is export
/// `name` of `s`.
fn overlay(s: &Served, name: &str, path: &Path) {
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &s.url(name),
            "-F",
            "raw",
            p(path),
        ],
    );
}

/// The `-blockdev` pair of drive `n`: the NBD node (`archive-vdN`,
/// read-only, reconnecting for 30 s) and the overlay on top (`overlay-vdN`).
fn blockdev_args(s: &Served, export: &str, overlay: &Path, n: usize) -> Vec<String> {
    let nbd = serde_json::json!({
        "driver": "nbd", "node-name": format!("archive-vd{n}"),
        "server": {"type": "unix", "path": p(&s.socket)},
        "export": export, "read-only": true, "reconnect-delay": 30,
    });
    let ov = serde_json::json!({
        "driver": "qcow2", "node-name": format!("overlay-vd{n}"),
        "file": {"driver": "file", "filename": p(overlay)},
        "backing": format!("archive-vd{n}"),
    });
    vec![
        "-blockdev".into(),
        nbd.to_string(),
        "-blockdev".into(),
        ov.to_string(),
        "-device".into(),
        format!("virtio-blk-pci,drive=overlay-vd{n},id=vd{n}"),
    ]
}

/// A VM that never runs its CPU (`-S`): devices and block layer only,
/// with two QMP sockets (one for the test, one for `vma live-restore`).
struct StoppedVm {
    child: Child,
    /// QEMU's stdout, where HMP `qemu-io` prints.
    out: PathBuf,
    test_qmp: Qmp,
    vma_qmp: PathBuf,
}

impl StoppedVm {
    fn start(dir: &Path, args: &[String]) -> StoppedVm {
        require("qemu-system-x86_64");
        let (a, b) = (dir.join("qmp-test.sock"), dir.join("qmp-vma.sock"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(args)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", p(&a)))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", p(&b)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("qemu.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap());
        // SAFETY: prctl is async-signal-safe: QEMU dies with the test.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start qemu-system-x86_64");
        let start = Instant::now();
        let test_qmp = loop {
            match Qmp::connect(&a) {
                Ok(q) => break q,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "QMP: {e}: {}",
                        std::fs::read_to_string(dir.join("qemu.err")).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        StoppedVm {
            child,
            out: dir.join("qemu.out"),
            test_qmp,
            vma_qmp: b,
        }
    }

    /// HMP `qemu-io` on device `vd0` (what the guest would do); its output
    /// (errors included), which QEMU prints on its stdout.
    fn io(&self, command: &str) -> String {
        self.io_on("vd0", command)
    }

    /// HMP `qemu-io` on device `dev`.
    fn io_on(&self, dev: &str, command: &str) -> String {
        let before = std::fs::metadata(&self.out).map_or(0, |m| m.len()) as usize;
        let reply = self
            .test_qmp
            .run(&HumanMonitorCommand {
                command_line: format!(
                    "qemu-io -d /machine/peripheral/{dev}/virtio-backend \"{command}\""
                ),
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let out = std::fs::read(&self.out).unwrap_or_default();
        let out = String::from_utf8_lossy(&out[before.min(out.len())..]).into_owned();
        assert!(
            out.contains(" bytes at offset ") && !reply.contains("Error"),
            "qemu-io {command}: {reply}{out}"
        );
        out
    }

    /// The node device vd0 reads.
    fn vd0_node(&self) -> String {
        self.node_of("vd0")
    }

    /// The node device `dev` reads.
    fn node_of(&self, dev: &str) -> String {
        let blocks = self.test_qmp.run(&QueryBlock).unwrap();
        blocks
            .iter()
            .find(|b| b.qdev.as_deref().is_some_and(|q| q.contains(dev)))
            .and_then(|b| b.inserted.as_ref())
            .map(|i| i.node_name.clone())
            .unwrap_or_default()
    }

    /// Quit QEMU as a guest shutdown would: images are flushed and closed
    /// (a killed QEMU loses the qcow2 metadata it had not yet written).
    fn quit(mut self) {
        let _ = self.test_qmp.run(&Quit);
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "QEMU did not quit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn node_names(&self) -> Vec<String> {
        self.test_qmp
            .run(&QueryNamedBlockNodes { flat: true })
            .unwrap()
            .into_iter()
            .map(|n| n.node_name)
            .collect()
    }
}

impl Drop for StoppedVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 64 MiB sparse disk (9 MiB of data) and its archive.
fn disk_and_archive(d: &Path) -> (PathBuf, PathBuf) {
    let img = d.join("disk.raw");
    sparse_image(
        &img,
        64 << 20,
        &[
            (0, 1 << 20, 1),
            (8 << 20, 4 << 20, 2),
            (40 << 20, 4 << 20, 3),
        ],
    );
    let archive = d.join("vm.vma");
    let o = vma(&["create", "-q", p(&archive), p(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    (img, archive)
}

fn live_restore(vm: &StoppedVm, drive: &str, extra: &[&str]) -> std::process::Output {
    let spec = drive.to_string();
    let mut args = vec!["live-restore", "--qmp", p(&vm.vma_qmp), "--drive", &spec];
    args.extend_from_slice(extra);
    vma(&args)
}

#[test]
fn an_overlay_on_the_export_takes_writes_and_the_archive_stays_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (img, archive) = disk_and_archive(d);
    let before = sha256_file(&archive);
    let s = Served::start(&archive, &d.join("s.sock"), &[]);
    let ov = d.join("overlay.qcow2");
    overlay(&s, "disk", &ov);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 192k", p(&ov)],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x5a 1M 192k", p(&ov)],
    );
    // The overlay reads as the image plus the write.
    let want = d.join("want.raw");
    std::fs::copy(&img, &want).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&want).unwrap();
    f.write_all_at(&vec![0x5a; 192 << 10], 1 << 20).unwrap();
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", p(&want), p(&ov)],
    );
    assert_eq!(s.stop(), 0);
    assert_eq!(sha256_file(&archive), before, "the archive changed");
}

#[test]
fn live_restore_moves_a_drive_off_the_archive_with_its_writes() {
    if !qemu_runs("live_restore_moves_a_drive_off_the_archive_with_its_writes") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (img, archive) = disk_and_archive(d);
    let before = sha256_file(&archive);
    let s = Served::start(&archive, &d.join("s.sock"), &[]);
    let ov = d.join("overlay.qcow2");
    overlay(&s, "disk", &ov);
    let vm = StoppedVm::start(d, &blockdev_args(&s, "disk", &ov, 0));
    let out = vm.io("write -P 0x77 8M 64k");
    assert!(!out.contains("failed"), "{out}");

    let target = d.join("restored.raw");
    // Named by the device's qdev id; the target file is created.
    let o = live_restore(&vm, &format!("vd0={}", p(&target)), &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no longer reads from vma"),
        "{}",
        stderr(&o)
    );
    assert!(
        vm.vd0_node().starts_with("vma-target-"),
        "{}",
        vm.vd0_node()
    );
    let nodes = vm.node_names();
    assert!(
        !nodes
            .iter()
            .any(|n| n == "archive-vd0" || n == "overlay-vd0"),
        "{nodes:?}"
    );
    // Stop serving: the VM reads and writes its disk without vma.
    assert_eq!(s.stop(), 0);
    let out = vm.io("read -P 0x77 8M 64k");
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");
    let out = vm.io("read 40M 4M");
    assert!(!out.contains("failed"), "{out}");
    let out = vm.io("write -P 0x33 60M 4k");
    assert!(!out.contains("failed"), "{out}");
    drop(vm);

    let want = d.join("want.raw");
    std::fs::copy(&img, &want).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&want).unwrap();
    f.write_all_at(&vec![0x77; 64 << 10], 8 << 20).unwrap();
    f.write_all_at(&vec![0x33; 4 << 10], 60 << 20).unwrap();
    if sha256_file(&target) != sha256_file(&want) {
        let o = Command::new("cmp")
            .args(["-l", p(&target), p(&want)])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&o.stdout);
        panic!(
            "{} differing bytes, first: {}",
            s.lines().count(),
            s.lines().take(3).collect::<Vec<_>>().join(" / ")
        );
    }
    assert!(allocated(&target) < 24 << 20, "holes stay holes");
    assert_eq!(sha256_file(&archive), before, "the archive changed");
}

#[test]
fn a_killed_server_restarted_on_its_socket_lets_the_restore_finish() {
    if !qemu_runs("a_killed_server_restarted_on_its_socket_lets_the_restore_finish") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (img, archive) = disk_and_archive(d);
    let sock = d.join("s.sock");
    let s = Served::start(&archive, &sock, &[]);
    let ov = d.join("overlay.qcow2");
    overlay(&s, "disk", &ov);
    let vm = StoppedVm::start(d, &blockdev_args(&s, "disk", &ov, 0));
    let target = d.join("restored.raw");
    // 9 MiB of data at 2 MiB/s: the server dies during the copy.
    let child = Command::new(vma_bin())
        .args([
            "live-restore",
            "--qmp",
            p(&vm.vma_qmp),
            "--speed",
            "2097152",
        ])
        .arg("--drive")
        .arg(format!("overlay-vd0={}", p(&target)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // A write while the copy runs (whole clusters: no read of the backing).
    vm.io("write -P 0x66 2M 128k");
    s.kill();
    std::thread::sleep(Duration::from_secs(3));
    let s = Served::start(&archive, &sock, &[]);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(s.stop(), 0);
    drop(vm);
    let want = d.join("want.raw");
    std::fs::copy(&img, &want).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&want).unwrap();
    f.write_all_at(&vec![0x66; 128 << 10], 2 << 20).unwrap();
    assert_eq!(sha256_file(&target), sha256_file(&want));
}

#[test]
fn damaged_data_stops_the_restore_and_salvage_lets_it_finish() {
    if !qemu_runs("damaged_data_stops_the_restore_and_salvage_lets_it_finish") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (img, archive) = disk_and_archive(d);
    // Damage a byte of the 4 MiB region at 8 MiB (zstd payload: the middle
    // of the file is inside it).
    let len = std::fs::metadata(&archive).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&archive)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, len / 2).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], len / 2).unwrap();
    drop(f);

    let sock = d.join("s.sock");
    let s = Served::start(&archive, &sock, &[]);
    let ov = d.join("overlay.qcow2");
    overlay(&s, "disk", &ov);
    let vm = StoppedVm::start(d, &blockdev_args(&s, "disk", &ov, 0));
    let target = d.join("restored.raw");
    let o = live_restore(
        &vm,
        &format!("overlay-vd0={}", p(&target)),
        &["--retries", "1"],
    );
    assert_ne!(code(&o), 0, "a restore over damaged data succeeded");
    assert!(stderr(&o).contains("--salvage"), "{}", stderr(&o));
    assert_eq!(vm.vd0_node(), "overlay-vd0", "the VM stays on the overlay");
    assert!(!vm.node_names().iter().any(|n| n.starts_with("vma-target")));
    assert!(s.messages().contains("--salvage"), "{}", s.messages());

    // Serve with --salvage on the same socket: the restore completes, the
    // damaged range as zeros.
    assert_eq!(s.stop(), 0);
    let s = Served::start(&archive, &sock, &["--salvage"]);
    assert!(s.messages().contains("served as zeros"), "{}", s.messages());
    assert!(
        !target.exists(),
        "the partial target made by live-restore is removed"
    );
    let o = live_restore(&vm, &format!("overlay-vd0={}", p(&target)), &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(s.stop(), 0);
    drop(vm);
    let (got, want) = (
        std::fs::read(&target).unwrap(),
        std::fs::read(&img).unwrap(),
    );
    let differ: Vec<usize> = (0..got.len() / 65536)
        .filter(|c| got[c * 65536..(c + 1) * 65536] != want[c * 65536..(c + 1) * 65536])
        .collect();
    assert!(
        !differ.is_empty(),
        "the damage was not zero-filled anywhere"
    );
    for c in &differ {
        assert!(got[c * 65536..(c + 1) * 65536].iter().all(|&b| b == 0));
    }
}

/// `img` with `writes` (offset, length, byte) applied, as `path`.
fn expected(img: &Path, path: &Path, writes: &[(u64, usize, u8)]) {
    std::fs::copy(img, path).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for &(offset, len, byte) in writes {
        f.write_all_at(&vec![byte; len], offset).unwrap();
    }
}

#[test]
fn two_drives_go_to_a_qcow2_image_and_a_block_device_in_one_run() {
    if !qemu_runs("two_drives_go_to_a_qcow2_image_and_a_block_device_in_one_run") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img0 = d.join("disk.raw");
    sparse_image(&img0, 64 << 20, &[(0, 1 << 20, 1), (8 << 20, 4 << 20, 2)]);
    let img1 = d.join("data.raw");
    sparse_image(
        &img1,
        (32 << 20) + 4096,
        &[(1 << 20, 3 << 20, 4), (32 << 20, 4096, 5)],
    );
    let archive = d.join("vm.vma");
    let o = vma(&["create", "-q", p(&archive), p(&img0), p(&img1)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = sha256_file(&archive);
    let s = Served::start(&archive, &d.join("s.sock"), &[]);
    let (ov0, ov1) = (d.join("overlay0.qcow2"), d.join("overlay1.qcow2"));
    overlay(&s, "disk", &ov0);
    overlay(&s, "data", &ov1);
    let mut args = blockdev_args(&s, "disk", &ov0, 0);
    args.extend(blockdev_args(&s, "data", &ov1, 1));
    let vm = StoppedVm::start(d, &args);
    vm.io_on("vd0", "write -P 0x71 8M 64k");
    vm.io_on("vd1", "write -P 0x72 2M 64k");

    // A qcow2 image made beforehand, and a block device (a loop device
    // over a file a little larger than the drive).
    let q = d.join("restored0.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&q), "64M"]);
    let backing = d.join("lv.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let dev = LoopDevice::attach(&backing, false);
    let o = vma(&[
        "live-restore",
        "--qmp",
        p(&vm.vma_qmp),
        "--drive",
        &format!("vd0=format=qcow2:{}", p(&q)),
        "--drive",
        &format!("overlay-vd1={}", p(dev.path())),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for dev in ["vd0", "vd1"] {
        let node = vm.node_of(dev);
        assert!(node.starts_with("vma-target-"), "{dev}: {node}");
    }
    let nodes = vm.node_names();
    assert!(
        !nodes
            .iter()
            .any(|n| n.starts_with("archive-vd") || n.starts_with("overlay-vd")),
        "{nodes:?}"
    );
    // Without vma: writes go to the targets.
    assert_eq!(s.stop(), 0);
    vm.io_on("vd0", "write -P 0x73 60M 4k");
    vm.io_on("vd1", "write -P 0x74 20M 4k");
    let out = vm.io_on("vd1", "read -P 0x72 2M 64k");
    assert!(!out.contains("failed"), "{out}");
    vm.quit();

    let want0 = d.join("want0.raw");
    expected(
        &img0,
        &want0,
        &[(8 << 20, 64 << 10, 0x71), (60 << 20, 4 << 10, 0x73)],
    );
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", p(&want0), p(&q)],
    );
    let want1 = d.join("want1.raw");
    expected(
        &img1,
        &want1,
        &[(2 << 20, 64 << 10, 0x72), (20 << 20, 4 << 10, 0x74)],
    );
    // The device holds the drive, then what was there before (zeros).
    let got = std::fs::read(dev.path()).unwrap();
    let want = std::fs::read(&want1).unwrap();
    assert!(got[..want.len()] == want[..], "the block device differs");
    assert!(got[want.len()..].iter().all(|&b| b == 0));
    assert_eq!(sha256_file(&archive), before, "the archive changed");
}

#[test]
fn a_full_target_stops_the_restore_the_vm_runs_on_and_a_rerun_finishes() {
    if !qemu_runs("a_full_target_stops_the_restore_the_vm_runs_on_and_a_rerun_finishes") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (img, archive) = disk_and_archive(d);
    let s = Served::start(&archive, &d.join("s.sock"), &[]);
    let ov = d.join("overlay.qcow2");
    overlay(&s, "disk", &ov);
    let vm = StoppedVm::start(d, &blockdev_args(&s, "disk", &ov, 0));
    vm.io("write -P 0x55 8M 64k");
    // 9 MiB of data into 4 MiB of space.
    let fs = SmallFs::new(&d.join("small"), "4m");
    let target = fs.path().join("restored.raw");
    let started = Instant::now();
    let o = live_restore(&vm, &format!("vd0={}", p(&target)), &["--retries", "1"]);
    let err = stderr(&o);
    assert_ne!(code(&o), 0, "a restore into a full file system succeeded");
    assert!(err.contains("writing the target"), "{err}");
    assert!(
        err.contains("free space on (or fix) the target, then run live-restore again"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // The VM still runs from the archive, through its overlay; the target
    // node and the file live-restore made are gone.
    assert_eq!(vm.vd0_node(), "overlay-vd0");
    assert!(!vm.node_names().iter().any(|n| n.starts_with("vma-target")));
    assert!(!target.exists(), "{:?}", fs.entries());
    let out = vm.io("read -P 0x55 8M 64k");
    assert!(!out.contains("failed"), "{out}");
    vm.io("write -P 0x56 40M 64k");

    // Space freed (the file system grown): the rerun finishes.
    let o = Command::new("mount")
        .args(["-o", "remount,size=128m"])
        .arg(fs.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = live_restore(&vm, &format!("vd0={}", p(&target)), &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(vm.vd0_node().starts_with("vma-target-"));
    assert_eq!(s.stop(), 0);
    vm.quit();
    let want = d.join("want.raw");
    expected(
        &img,
        &want,
        &[(8 << 20, 64 << 10, 0x55), (40 << 20, 64 << 10, 0x56)],
    );
    assert_eq!(sha256_file(&target), sha256_file(&want));
}

// ---- a real guest ----

fn ext4_image(dir: &Path, img: &Path, size: &str) {
    require("mkfs.ext4");
    let root = dir.join("fs-root");
    std::fs::create_dir_all(root.join("data")).unwrap();
    let mut sums = String::new();
    for i in 0..20 {
        let name = format!("data/f{i}.bin");
        std::fs::write(
            root.join(&name),
            noise(100 + i, 100_000 + 4096 * i as usize),
        )
        .unwrap();
        sums.push_str(&format!("{}  {name}\n", sha256_file(&root.join(&name))));
    }
    std::fs::write(root.join("data/big.bin"), noise(7, 6 << 20)).unwrap();
    sums.push_str(&format!(
        "{}  data/big.bin\n",
        sha256_file(&root.join("data/big.bin"))
    ));
    std::fs::write(root.join("SHA256SUMS"), sums).unwrap();
    ok("mkfs.ext4", &["-q", "-F", "-d", p(&root), p(img), size]);
}

fn e2fsck_clean(img: &Path) {
    ok("e2fsck", &["-fn", p(img)]);
}

/// `debugfs -R 'cat PATH'`.
fn debugfs_cat(img: &Path, path: &str) -> Vec<u8> {
    require("debugfs");
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), p(img)])
        .output()
        .unwrap();
    assert!(o.status.success(), "debugfs cat {path}");
    o.stdout
}

/// The guest: checks the archive's files, writes files (some before the
/// restore, some during, some after, told by lines on its second serial
/// port), then reports what its disk holds and powers off.
const GUEST: &str = r#"sha256sum -c SHA256SUMS >/dev/null && echo "VMATEST check-ok"
w() { yes "file $1" | head -c $2 > w$1.bin; sync; echo "VMATEST wrote $1"; }
w 1 300000; w 2 70000
echo "VMATEST ready"
read x < /dev/ttyS1
w 3 1048576
echo "VMATEST wrote-after"
read x < /dev/ttyS1
w 4 5000
sync; echo 3 > /proc/sys/vm/drop_caches
sha256sum -c SHA256SUMS >/dev/null && echo "VMATEST recheck-ok"
cd /; mount -o remount,ro /mnt; echo 3 > /proc/sys/vm/drop_caches
echo "VMATEST dev $(sha256sum /dev/vda | cut -d' ' -f1)"
"#;

fn send(ctl: &Path, line: &str) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(ctl).expect("guest control socket");
    s.write_all(line.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
}

/// Boot the guest from `archive` (drive "disk") through an overlay,
/// restore it live to a raw target, stop serving, let the guest finish.
/// Returns the target and the device digest the guest saw.
fn boot_and_restore(d: &Path, archive: &Path, extra: &[&str]) -> (PathBuf, String) {
    let before = sha256_file(archive);
    let s = Served::start(archive, &d.join("s.sock"), extra);
    let ov = d.join("overlay.qcow2");
    overlay(&s, "disk", &ov);
    let ctl = d.join("ctl.sock");
    let mut args = blockdev_args(&s, "disk", &ov, 0);
    let vma_qmp = d.join("qmp-vma.sock");
    args.extend([
        "-chardev".into(),
        format!("socket,id=ctl,path={},server=on,wait=off", p(&ctl)),
        "-serial".into(),
        "chardev:ctl".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p(&vma_qmp)),
    ]);
    let mut config = GuestConfig::new(Vec::new()).script(GUEST);
    config.extra_args = args;
    let mut g = Guest::boot(&config);
    let init = g.init_time(default_timeout());
    g.wait_for("VMATEST check-ok", default_timeout());
    g.wait_for("VMATEST ready", default_timeout());
    eprintln!("guest ({:?}): init after {init:.2?}", g.accel);

    let target = d.join("restored.raw");
    let started = Instant::now();
    // Rate-limited so that the guest writes while the copy runs.
    let mut restore = Command::new(vma_bin())
        .args(["live-restore", "--qmp", p(&vma_qmp), "--speed", "1048576"])
        .arg("--drive")
        .arg(format!("vd0={}", p(&target)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    send(&ctl, "go\n");
    g.wait_for("VMATEST wrote 3", default_timeout());
    let copying = restore.try_wait().unwrap().is_none();
    let o = restore.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}\n{}", g.serial());
    eprintln!("live restore took {:.2?}", started.elapsed());
    // Timing on a loaded machine: the stopped-VM test above checks writes
    // during the copy deterministically.
    if !copying {
        eprintln!("note: the copy ended before the guest's write during it");
    }
    // The VM no longer needs vma.
    assert_eq!(s.stop(), 0);
    g.wait_for("VMATEST wrote-after", default_timeout());
    send(&ctl, "go\n");
    g.wait_for("VMATEST recheck-ok", default_timeout());
    let dev = g.wait_for("VMATEST dev ", default_timeout()).text;
    assert_eq!(g.wait_script(default_timeout()), 0, "{}", g.serial());
    assert_eq!(sha256_file(archive), before, "the archive changed");
    let dev = dev.trim_start_matches("VMATEST dev ").trim().to_string();
    (target, dev)
}

/// What the guest wrote, as the host expects it.
fn pattern(word: &str, len: usize) -> Vec<u8> {
    let unit = format!("{word}\n").into_bytes();
    unit.iter().copied().cycle().take(len).collect()
}

fn check_target(target: &Path, guest_dev: &str, archive_img: &Path) {
    assert_eq!(
        sha256_file(target),
        guest_dev,
        "the target is what the guest saw"
    );
    e2fsck_clean(target);
    for (i, len) in [(1, 300_000), (2, 70_000), (3, 1 << 20), (4, 5000)] {
        assert!(
            debugfs_cat(target, &format!("/w{i}.bin")) == pattern(&format!("file {i}"), len),
            "w{i}.bin"
        );
    }
    // Everything else as in the archive: each archived file unchanged.
    let sums = String::from_utf8(debugfs_cat(archive_img, "/SHA256SUMS")).unwrap();
    for line in sums.lines() {
        let name = line.split_whitespace().nth(1).unwrap();
        assert!(
            debugfs_cat(target, &format!("/{name}"))
                == debugfs_cat(archive_img, &format!("/{name}")),
            "{name} differs from the archive"
        );
    }
}

#[test]
fn a_guest_boots_from_the_archive_and_is_restored_live() {
    if !qemu_runs("a_guest_boots_from_the_archive_and_is_restored_live") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = d.join("disk.raw");
    ext4_image(d, &img, "64M");
    let archive = d.join("vm.vma");
    let o = vma(&["create", "-q", p(&archive), p(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let (target, dev) = boot_and_restore(d, &archive, &[]);
    check_target(&target, &dev, &img);
}

#[test]
fn a_guest_boots_from_the_middle_of_a_chain_and_is_restored_live() {
    if !qemu_runs("a_guest_boots_from_the_middle_of_a_chain_and_is_restored_live") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = d.join("disk.raw");
    ext4_image(d, &img, "64M");
    let full = d.join("full.vma");
    let o = vma(&["create", "-q", p(&full), p(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Point 2: files changed and added (a new file system image of the same
    // size, so most of it differs only where the files are).
    let mid_dir = d.join("mid");
    std::fs::create_dir_all(&mid_dir).unwrap();
    let mid_img = mid_dir.join("disk.raw");
    std::fs::copy(&img, &mid_img).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&mid_img)
        .unwrap();
    // Change a block of free space and rewrite a file through debugfs.
    f.write_all_at(&noise(9, 256 << 10), 50 << 20).unwrap();
    drop(f);
    let extra = mid_dir.join("extra.bin");
    std::fs::write(&extra, noise(10, 300_000)).unwrap();
    ok(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} extra.bin", p(&extra)),
            p(&mid_img),
        ],
    );
    let mid = d.join("mid.vma");
    diff_archive(&full, &mid_img, &mid);
    // Point 3 changes more; the guest boots from point 2.
    let new_img = d.join("new").join("disk.raw");
    std::fs::create_dir_all(new_img.parent().unwrap()).unwrap();
    std::fs::copy(&mid_img, &new_img).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&new_img)
        .unwrap();
    f.write_all_at(&noise(11, 1 << 20), 52 << 20).unwrap();
    drop(f);
    diff_archive(&mid, &new_img, &d.join("newest.vma"));

    let (target, dev) = boot_and_restore(d, &mid, &[]);
    check_target(&target, &dev, &mid_img);
    assert!(debugfs_cat(&target, "/extra.bin") == noise(10, 300_000));
}

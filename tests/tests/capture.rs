//! `vma capture` against a real `qemu-storage-daemon`: qcow2 and raw nodes,
//! guest writes through a writable NBD export of the same nodes while the
//! (speed-limited) backup job runs, full and incremental captures restored
//! and compared byte for byte, and failures that must leave no archive.
//! Most tests run twice: with backup jobs reading the drives, and with
//! `--fleecing` (backup jobs reading point-in-time views); `--diff-against`
//! compares such views with an archive made without bitmaps.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vma_capture::qmp::{
    BlockdevAdd, BlockdevOptions, BlockdevRef, Driver, NbdServerStart, NbdServerStop, Qmp,
    QueryBlockExports, QueryJobs, QueryNamedBlockNodes, Quit, SocketAddressLegacy,
    UnixSocketAddress,
};
use vma_core::format::{RunKind, CLUSTER_SIZE};
use vma_core::{DriveId, Reader};
use vma_tests::{code, noise, require, stderr, stdout, vma, vma_bin, without_configs, SmallFs};

const CS: u64 = CLUSTER_SIZE as u64;

/// The tests time guest writes and signals against speed-limited jobs:
/// run them one at a time so they do not slow each other down.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A qemu-storage-daemon with a QMP socket and an NBD server for "guest"
/// writes; killed on drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    /// Start with `nodes` (name, image path, format) exported writable.
    fn start(dir: &Path, nodes: &[(&str, &Path, &str)]) -> Daemon {
        Daemon::spawn(dir, nodes, true, Stdio::inherit())
    }

    /// Start with `nodes` and no NBD server (so none for guest writes).
    fn start_without_nbd(dir: &Path, nodes: &[(&str, &Path, &str)]) -> Daemon {
        Daemon::spawn(dir, nodes, false, Stdio::inherit())
    }

    /// Start with `nodes` and no NBD server, its messages going to `log`.
    fn start_logged(dir: &Path, nodes: &[(&str, &Path, &str)], log: &Path) -> Daemon {
        let log = std::fs::File::create(log).expect("creating the daemon's log");
        Daemon::spawn(dir, nodes, false, Stdio::from(log))
    }

    fn spawn(dir: &Path, nodes: &[(&str, &Path, &str)], guest_nbd: bool, stderr: Stdio) -> Daemon {
        require("qemu-storage-daemon");
        require("qemu-io");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            // A monitor of the test's own, usable while vma holds the first.
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp1,path={},server=on,wait=off",
                dir.join("test-qmp.sock").display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp1");
        if guest_nbd {
            cmd.arg("--nbd-server").arg(format!(
                "addr.type=unix,addr.path={}",
                dir.join("guest.sock").display()
            ));
        }
        for (name, path, format) in nodes {
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name={name}-file,filename={}",
                path.display()
            ));
            cmd.arg("--blockdev")
                .arg(format!("driver={format},node-name={name},file={name}-file"));
            if guest_nbd {
                cmd.arg("--export").arg(format!(
                    "type=nbd,id={name}-exp,node-name={name},name={name},writable=on"
                ));
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting qemu-storage-daemon");
        let deadline = Instant::now() + Duration::from_secs(10);
        while (guest_nbd && !dir.join("guest.sock").exists())
            || !dir.join("qmp.sock").exists()
            || !dir.join("test-qmp.sock").exists()
        {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// A connection to the test's own monitor.
    fn qmp(&self) -> Qmp {
        Qmp::connect(&self.dir.join("test-qmp.sock")).expect("QMP connect")
    }

    /// The socket of the daemon's NBD server (the guest's).
    fn guest_socket(&self) -> PathBuf {
        self.dir.join("guest.sock")
    }

    /// Names of every block node.
    fn node_names(&self) -> BTreeSet<String> {
        let nodes = self
            .qmp()
            .run(&QueryNamedBlockNodes { flat: true })
            .unwrap();
        nodes.into_iter().map(|n| n.node_name).collect()
    }

    /// Ids of the NBD exports.
    fn exports(&self) -> Vec<String> {
        let exports = self.qmp().run(&QueryBlockExports).unwrap();
        exports.into_iter().map(|e| e.id).collect()
    }

    /// Wait until QEMU lists the job `id` (its transaction has run).
    fn wait_for_job(&self, id: &str) {
        let qmp = self.qmp();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let jobs = qmp.run(&QueryJobs).unwrap();
            if jobs.iter().any(|j| j.id == id) {
                return;
            }
            assert!(Instant::now() < deadline, "job {id} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// No job is left.
    fn assert_no_jobs(&self) {
        assert_eq!(self.qmp().run(&QueryJobs).unwrap(), vec![]);
    }

    /// A guest write of `len` bytes of `pattern` at `offset` of `node`.
    fn guest_write(&self, node: &str, offset: u64, len: u64, pattern: u8) {
        let uri = format!(
            "nbd+unix:///{node}?socket={}",
            self.dir.join("guest.sock").display()
        );
        let out = Command::new("qemu-io")
            .args(["-f", "raw", &uri, "-c"])
            .arg(format!("write -P {pattern} {offset} {len}"))
            .output()
            .expect("qemu-io");
        assert!(
            out.status.success(),
            "qemu-io: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What the guest sees on `node` now, as raw bytes.
    fn contents(&self, node: &str) -> Vec<u8> {
        let uri = format!(
            "nbd+unix:///{node}?socket={}",
            self.dir.join("guest.sock").display()
        );
        let raw = self.dir.join(format!("{node}-now.raw"));
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&raw)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "qemu-img: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&raw).unwrap();
        std::fs::remove_file(&raw).unwrap();
        data
    }

    /// Names of the dirty bitmaps of `node`.
    fn bitmaps(&self, node: &str) -> Vec<String> {
        let nodes = self
            .qmp()
            .run(&QueryNamedBlockNodes { flat: true })
            .unwrap();
        nodes
            .into_iter()
            .filter(|n| n.node_name == node)
            .flat_map(|n| n.dirty_bitmaps.unwrap_or_default())
            .map(|b| b.name)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qcow2 image of `size` bytes with noise in some clusters, zeros elsewhere.
fn make_qcow2(path: &Path, size: u64, seed: u64) {
    let raw = path.with_extension("seed.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..size / CS {
        if !(i * 7 + seed).is_multiple_of(3) {
            f.write_all_at(&noise(seed * 1000 + i, CS as usize), i * CS)
                .unwrap();
        }
    }
    let tail = size % CS;
    if tail > 0 {
        f.write_all_at(&noise(seed + 77, tail as usize), size - tail)
            .unwrap();
    }
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(raw).unwrap();
}

/// A daemon serving one 16 MiB qcow2 node `disk0` (contents from `seed`),
/// and a full capture of it (`full.vma`, made with `args`).
fn one_disk_with_full(dir: &Path, seed: u64, args: &[impl AsRef<OsStr>]) -> (Daemon, PathBuf) {
    let img = dir.join("disk0.qcow2");
    make_qcow2(&img, 16 * 1024 * 1024, seed);
    let d = Daemon::start(dir, &[("disk0", &img, "qcow2")]);
    let full = dir.join("full.vma");
    run_capture(&d, &full, args);
    (d, full)
}

/// How a test captures: backup jobs reading the drives, or `--fleecing`
/// through scratch images in a directory of its own.
struct Mode(Option<PathBuf>);

impl Mode {
    fn plain() -> Mode {
        Mode(None)
    }

    /// Fleecing through `dir/scratch`.
    fn fleecing(dir: &Path) -> Mode {
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        Mode(Some(scratch))
    }

    fn is_fleecing(&self) -> bool {
        self.0.is_some()
    }

    /// `args` and the mode's own arguments.
    fn args(&self, args: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if let Some(dir) = &self.0 {
            out.push("--fleecing".into());
            out.push(dir.to_str().unwrap().into());
        }
        out
    }

    /// Files in the scratch directory (none once a capture has ended).
    fn scratch_files(&self) -> Vec<String> {
        match &self.0 {
            Some(dir) => std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Bytes the scratch images take on disk now.
    fn scratch_bytes(&self) -> u64 {
        match &self.0 {
            Some(dir) => std::fs::read_dir(dir)
                .unwrap()
                .map(|e| vma_tests::allocated(&e.unwrap().path()))
                .sum(),
            None => 0,
        }
    }

    /// After a capture: the daemon has the nodes it had before, no job,
    /// and no scratch image is left.
    fn assert_clean(&self, d: &Daemon, nodes: &BTreeSet<String>) {
        assert_eq!(&d.node_names(), nodes, "block nodes left behind");
        d.assert_no_jobs();
        assert!(
            self.scratch_files().is_empty(),
            "scratch files left: {:?}",
            self.scratch_files()
        );
    }
}

fn capture_cmd(d: &Daemon, archive: &Path, extra: &[impl AsRef<OsStr>]) -> Command {
    let mut cmd = Command::new(vma_bin());
    cmd.arg("capture")
        .arg("--qmp")
        .arg(d.qmp_path())
        .arg(archive)
        .args(extra)
        .stdin(Stdio::null());
    cmd
}

fn run_capture(d: &Daemon, archive: &Path, extra: &[impl AsRef<OsStr>]) -> String {
    let out = capture_cmd(d, archive, extra).output().unwrap();
    assert_eq!(code(&out), 0, "capture failed: {}", stderr(&out));
    stderr(&out)
}

/// Restore drive `name` of `archive`, applying its chain of parents
/// (`chain`, oldest first, ending with `archive`): the parent's contents
/// under every cluster the archive marks unchanged.
fn restore(chain: &[&Path], name: &str) -> Vec<u8> {
    let mut image: Option<Vec<u8>> = None;
    for path in chain {
        let r = Reader::open(path).unwrap();
        let d = r
            .header()
            .drives
            .iter()
            .find(|d| d.name == name)
            .unwrap()
            .clone();
        let mut img = image.take().unwrap_or_else(|| vec![0u8; d.size as usize]);
        img.resize(d.size as usize, 0);
        for run in r.runs(d.id).unwrap().map(Result::unwrap) {
            if run.kind == RunKind::Unchanged {
                continue;
            }
            let start = run.start * CS;
            let end = ((run.start + run.count as u64) * CS).min(d.size);
            r.read_at(d.id, start, &mut img[start as usize..end as usize])
                .unwrap();
        }
        image = Some(img);
    }
    image.unwrap()
}

/// Clusters of drive `name` an archive stores (data or zero, not unchanged).
fn stored_clusters(archive: &Path, name: &str) -> Vec<u64> {
    let r = Reader::open(archive).unwrap();
    let d = r
        .header()
        .drives
        .iter()
        .find(|d| d.name == name)
        .unwrap()
        .clone();
    r.runs(d.id)
        .unwrap()
        .map(Result::unwrap)
        .filter(|run| run.kind != RunKind::Unchanged)
        .flat_map(|run| run.start..run.start + run.count as u64)
        .collect()
}

fn drive_id(archive: &Path, name: &str) -> DriveId {
    let r = Reader::open(archive).unwrap();
    r.header()
        .drives
        .iter()
        .find(|d| d.name == name)
        .unwrap()
        .id
}

#[test]
fn full_capture_during_guest_writes_is_the_disk_at_job_start() {
    full_capture_during_guest_writes(|_| Mode::plain());
}

#[test]
fn fleecing_full_capture_during_guest_writes_is_the_disk_at_job_start() {
    full_capture_during_guest_writes(Mode::fleecing);
}

fn full_capture_during_guest_writes(mode: fn(&Path) -> Mode) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mode = mode(dir.path());
    let size = 24 * CS * 16 + 512; // 24 MiB and a 512-byte tail
    let img = dir.path().join("disk0.qcow2");
    make_qcow2(&img, size, 1);
    let d = Daemon::start(dir.path(), &[("disk0", &img, "qcow2")]);
    let nodes = d.node_names();
    let before = d.contents("disk0");
    assert_eq!(before.len() as u64, size);

    let archive = dir.path().join("full.vma");
    // 4 MiB/s: the job runs about six seconds, the guest writes meanwhile,
    // from the end of the disk backwards (clusters the job has not reached).
    let job = capture_cmd(
        &d,
        &archive,
        &mode.args(&["--drive", "disk0", "--speed", "4194304"]),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    d.wait_for_job("vma-backup-0");
    let scratch_before = mode.scratch_bytes();
    let mut written = Vec::new();
    for i in 0..12u64 {
        let offset = size - 512 - (i * 2 + 1) * CS * 8;
        d.guest_write("disk0", offset, CS, 0xA0 + i as u8);
        written.push(offset / CS);
    }
    d.guest_write("disk0", size - 512, 512, 0xEE);
    written.push(size / CS);
    if mode.is_fleecing() {
        // The guest's writes went through the fleecing filter: the old
        // contents of the clusters that held data were copied into the
        // scratch image (zero clusters take no space there).
        let with_data = written
            .iter()
            .filter(|&&c| {
                let end = ((c + 1) * CS).min(size) as usize;
                before[(c * CS) as usize..end].iter().any(|&b| b != 0)
            })
            .count() as u64;
        let grown = mode.scratch_bytes() - scratch_before;
        assert!(
            with_data > 5 && grown >= with_data * CS,
            "the scratch image grew by {grown} bytes for {with_data} clusters with data"
        );
    }
    let out = job.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "capture failed: {}", stderr(&out));
    let msg = stderr(&out);
    if mode.is_fleecing() {
        assert!(msg.contains("scratch images took at most"), "{msg}");
    } else {
        // Copy-before-write sent the old clusters first.
        let ooo: u64 = msg
            .split(" clusters arrived out of order")
            .next()
            .and_then(|s| s.rsplit(", ").next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no out-of-order count in: {msg}"));
        assert!(ooo > 0, "the writer saw no out-of-order data: {msg}");
    }
    mode.assert_clean(&d, &nodes);

    let now = d.contents("disk0");
    assert_ne!(now, before, "the guest writes did not land");
    assert!(
        restore(&[&archive], "disk0") == before,
        "the capture is not the disk at job start"
    );
    let x = dir.path().join("x");
    let out = vma(&["extract", archive.to_str().unwrap(), x.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(x.join("disk0.raw")).unwrap() == before);
    let out = vma(&["verify", archive.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The checkpoint bitmap was left on the node, named in the archive.
    let bitmaps = d.bitmaps("disk0");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    let record = vma(&["config", archive.to_str().unwrap(), "vma-capture.json"]);
    assert!(vma_tests::stdout(&record).contains(&bitmaps[0]));
}

#[test]
fn incremental_chain_restores_every_point_in_time() {
    incremental_chain(|_| Mode::plain());
}

#[test]
fn fleecing_incremental_chain_restores_every_point_in_time() {
    incremental_chain(Mode::fleecing);
}

fn incremental_chain(mode: fn(&Path) -> Mode) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mode = mode(dir.path());
    let size = 4 * 1024 * 1024;
    let a_img = dir.path().join("a.qcow2");
    let b_img = dir.path().join("b.qcow2");
    let c_img = dir.path().join("c.raw");
    make_qcow2(&a_img, size, 2);
    make_qcow2(&b_img, size + 512, 3);
    std::fs::write(&c_img, noise(4, 3 * CS as usize)).unwrap();
    let d = Daemon::start(
        dir.path(),
        &[
            ("a", &a_img, "qcow2"),
            ("b", &b_img, "qcow2"),
            ("c", &c_img, "raw"),
        ],
    );
    let nodes = d.node_names();
    let drives = ["--drive", "a", "--drive", "b", "--drive", "c"];
    let full = dir.path().join("0.vma");
    run_capture(&d, &full, &mode.args(&drives));
    mode.assert_clean(&d, &nodes);
    let points0 = [d.contents("a"), d.contents("b"), d.contents("c")];

    // Incremental 1: a few writes on a and b; c is raw (no persistent
    // bitmap needed: bitmaps live as long as the daemon).
    d.guest_write("a", 3 * CS, 2 * CS, 0x11);
    d.guest_write("b", size, 512, 0x22);
    d.guest_write("c", 100, 10, 0x33);
    let inc1 = dir.path().join("1.vma");
    let msg = run_capture(
        &d,
        &inc1,
        &mode.args(&[&drives[..], &["--incremental-from", full.to_str().unwrap()]].concat()),
    );
    mode.assert_clean(&d, &nodes);
    assert!(msg.contains("incremental backup"), "{msg}");
    let points1 = [d.contents("a"), d.contents("b"), d.contents("c")];
    assert_eq!(stored_clusters(&inc1, "a"), vec![3, 4]);
    assert_eq!(stored_clusters(&inc1, "b"), vec![size / CS]);
    assert_eq!(stored_clusters(&inc1, "c"), vec![0]);

    // Incremental 2, with a fourth drive added since: it alone is full.
    let d_img = dir.path().join("d.qcow2");
    make_qcow2(&d_img, 2 * 1024 * 1024, 5);
    // One QMP client at a time: this one is gone before the capture connects.
    let file = BlockdevOptions::unnamed(Driver::File {
        filename: d_img.clone(),
    });
    let file = BlockdevRef::Options(Box::new(file));
    d.qmp()
        .run(&BlockdevAdd(BlockdevOptions::new(
            "d",
            Driver::Qcow2 { file },
        )))
        .unwrap();
    d.guest_write("a", 0, CS, 0x44);
    let inc2 = dir.path().join("2.vma");
    let nodes = d.node_names();
    let msg = run_capture(
        &d,
        &inc2,
        &mode.args(
            &[
                &drives[..],
                &["--drive", "d", "--incremental-from", inc1.to_str().unwrap()],
            ]
            .concat(),
        ),
    );
    mode.assert_clean(&d, &nodes);
    assert!(
        msg.contains("drive d (node d): full backup (not in the parent archive)"),
        "{msg}"
    );
    let points2 = [d.contents("a"), d.contents("b"), d.contents("c")];
    assert_eq!(stored_clusters(&inc2, "a"), vec![0]);
    assert!(stored_clusters(&inc2, "b").is_empty());

    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        assert!(restore(&[&full], name) == points0[i], "{name} at point 0");
        assert!(
            restore(&[&full, &inc1], name) == points1[i],
            "{name} at point 1"
        );
        assert!(
            restore(&[&full, &inc1, &inc2], name) == points2[i],
            "{name} at point 2"
        );
    }
    let mut d_raw = vec![0u8; 2 * 1024 * 1024];
    let r = Reader::open(&inc2).unwrap();
    r.read_at(drive_id(&inc2, "d"), 0, &mut d_raw).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(&d_img)
        .arg(dir.path().join("d-now.raw"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(std::fs::read(dir.path().join("d-now.raw")).unwrap() == d_raw);

    // The CLI restores each point in time, finding the parents beside the
    // archive by uuid: extract, and a mount.
    for (archive, points) in [(&inc1, &points1), (&inc2, &points2)] {
        let x = dir.path().join(format!(
            "x-{}",
            archive.file_name().unwrap().to_string_lossy()
        ));
        let out = vma(&["extract", archive.to_str().unwrap(), x.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            assert!(
                std::fs::read(x.join(format!("{name}.raw"))).unwrap() == points[i],
                "{name}"
            );
        }
    }
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = vma(&["mount", inc2.to_str().unwrap(), mnt.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let seen: Vec<Vec<u8>> = ["a", "b", "c"]
        .iter()
        .map(|n| std::fs::read(mnt.join(format!("{n}.raw"))).unwrap())
        .collect();
    let out = vma(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for i in 0..3 {
        assert!(seen[i] == points2[i], "mounted drive {i}");
    }
    // Without its parent, a clear error naming the uuid it needs.
    let moved = dir.path().join("elsewhere");
    std::fs::create_dir(&moved).unwrap();
    std::fs::rename(&full, moved.join("0.vma")).unwrap();
    let out = vma(&[
        "extract",
        inc2.to_str().unwrap(),
        dir.path().join("y").to_str().unwrap(),
    ]);
    assert_ne!(code(&out), 0);
    let full_uuid =
        vma_core::types::uuid_text(&Reader::open(&moved.join("0.vma")).unwrap().header().uuid);
    assert!(stderr(&out).contains(&full_uuid), "{}", stderr(&out));
    let out = vma(&[
        "extract",
        "--parent",
        moved.join("0.vma").to_str().unwrap(),
        inc2.to_str().unwrap(),
        dir.path().join("y").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    std::fs::rename(moved.join("0.vma"), &full).unwrap();

    // on-success: each node keeps only the newest checkpoint.
    let record = vma_tests::stdout(&vma(&[
        "config",
        inc2.to_str().unwrap(),
        "vma-capture.json",
    ]));
    for name in ["a", "b", "c", "d"] {
        let bitmaps = d.bitmaps(name);
        assert_eq!(bitmaps.len(), 1, "{name}: {bitmaps:?}");
        assert!(
            record.contains(&bitmaps[0]),
            "{name}: {bitmaps:?} not in {record}"
        );
    }
}

#[test]
fn incremental_during_guest_writes_is_the_point_in_time_in_every_bitmap_mode() {
    incremental_during_guest_writes(|_| Mode::plain());
}

#[test]
fn fleecing_incremental_during_guest_writes_is_the_point_in_time_in_every_bitmap_mode() {
    incremental_during_guest_writes(Mode::fleecing);
}

/// Clusters `clusters` rewritten by the guest with `pattern`.
fn rewrite(d: &Daemon, clusters: impl IntoIterator<Item = u64>, pattern: u8) -> Vec<u64> {
    let mut written: Vec<u64> = clusters.into_iter().collect();
    for &c in &written {
        d.guest_write("disk0", c * CS, CS, pattern);
    }
    written.sort_unstable();
    written.dedup();
    written
}

fn incremental_during_guest_writes(mode: fn(&Path) -> Mode) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mode = mode(dir.path());
    let (d, full) = one_disk_with_full(dir.path(), 12, &mode.args(&["--drive", "disk0"]));
    let nodes = d.node_names();
    let base = d.bitmaps("disk0");
    // 64 clusters changed since the full: about four seconds at 1 MiB/s.
    let s1 = rewrite(&d, (0..64).map(|i| i * 3 + 1), 0x31);
    let point1 = d.contents("disk0");

    // A differential (`never`) while the guest writes, some of it where
    // the job has yet to copy.
    let inc1 = dir.path().join("inc1.vma");
    let full_arg = full.to_str().unwrap();
    let mut job = capture_cmd(
        &d,
        &inc1,
        &mode.args(&[
            "--drive",
            "disk0",
            "--speed",
            "1048576",
            "--bitmap-mode",
            "never",
            "--incremental-from",
            full_arg,
        ]),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    d.wait_for_job("vma-backup-0");
    let s2 = rewrite(&d, [190, 187, 100, 5, 250, 130], 0x32);
    assert!(
        job.try_wait().unwrap().is_none(),
        "the capture ended before the guest's writes"
    );
    let out = job.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    mode.assert_clean(&d, &nodes);
    assert_eq!(stored_clusters(&inc1, "disk0"), s1);
    assert!(
        restore(&[&full, &inc1], "disk0") == point1,
        "the incremental is not the disk at job start"
    );
    // `never`: the base is untouched, the new checkpoint added.
    let record1 = vma_tests::stdout(&vma(&[
        "config",
        inc1.to_str().unwrap(),
        "vma-capture.json",
    ]));
    let after1 = d.bitmaps("disk0");
    assert_eq!(after1.len(), 2, "{after1:?}");
    assert!(after1.contains(&base[0]), "{after1:?}");
    let n1 = after1.iter().find(|b| **b != base[0]).unwrap().clone();
    assert!(record1.contains(&n1), "{record1}");

    // `on-success` against the same full: everything since it.
    let now = d.contents("disk0");
    let inc2 = dir.path().join("inc2.vma");
    run_capture(
        &d,
        &inc2,
        &mode.args(&["--drive", "disk0", "--incremental-from", full_arg]),
    );
    mode.assert_clean(&d, &nodes);
    let mut s12: Vec<u64> = s1.iter().chain(&s2).copied().collect();
    s12.sort_unstable();
    s12.dedup();
    assert_eq!(stored_clusters(&inc2, "disk0"), s12);
    assert!(restore(&[&full, &inc2], "disk0") == now);
    let after2 = d.bitmaps("disk0");
    assert!(
        !after2.contains(&base[0]),
        "the base was not consumed: {after2:?}"
    );
    assert!(after2.contains(&n1) && after2.len() == 2, "{after2:?}");

    // From the differential's checkpoint: only what the guest wrote while
    // (and after) it ran.
    let inc3 = dir.path().join("inc3.vma");
    run_capture(
        &d,
        &inc3,
        &mode.args(&[
            "--drive",
            "disk0",
            "--incremental-from",
            inc1.to_str().unwrap(),
        ]),
    );
    assert_eq!(stored_clusters(&inc3, "disk0"), s2);
    assert!(restore(&[&full, &inc1, &inc3], "disk0") == now);
}

#[test]
fn cancel_and_daemon_death_leave_no_archive_and_bitmaps_as_they_were() {
    cancel_and_daemon_death(|_| Mode::plain());
}

#[test]
fn fleecing_cancel_and_daemon_death_leave_no_archive_and_bitmaps_as_they_were() {
    cancel_and_daemon_death(Mode::fleecing);
}

fn cancel_and_daemon_death(mode: fn(&Path) -> Mode) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mode = mode(dir.path());
    let (d, full) = one_disk_with_full(dir.path(), 6, &mode.args(&["--drive", "disk0"]));
    let nodes = d.node_names();
    let checkpoint = d.bitmaps("disk0");
    assert_eq!(checkpoint.len(), 1);
    d.guest_write("disk0", 0, 8 * 1024 * 1024, 0x55);

    // Ctrl-C during a slow incremental: nothing kept, the parent's bitmap
    // is untouched (still everything since the full), no new bitmap, no
    // job or NBD node left behind.
    let inc = dir.path().join("inc.vma");
    let child = capture_cmd(
        &d,
        &inc,
        &mode.args(&[
            "--drive",
            "disk0",
            "--speed",
            "1048576",
            "--incremental-from",
            full.to_str().unwrap(),
        ]),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    d.wait_for_job("vma-backup-0");
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill(2) on our own child's pid touches no memory.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("cancelled"), "{}", stderr(&out));
    assert!(!inc.exists());
    assert_eq!(d.bitmaps("disk0"), checkpoint);
    let jobs = d.qmp().run(&QueryJobs).unwrap();
    assert_eq!(jobs, vec![]);
    mode.assert_clean(&d, &nodes);
    let nodes = d.qmp().run(&QueryNamedBlockNodes { flat: true }).unwrap();
    assert!(
        !nodes
            .iter()
            .any(|n| n.node_name.contains("vma-target") || n.file.contains("vma-target")),
        "{nodes:?}"
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );

    // The retry copies everything written since the full backup.
    run_capture(
        &d,
        &inc,
        &mode.args(&[
            "--drive",
            "disk0",
            "--incremental-from",
            full.to_str().unwrap(),
        ]),
    );
    assert_eq!(stored_clusters(&inc, "disk0").len(), 128);
    std::fs::remove_file(&inc).unwrap();

    // The daemon dies mid-job: a clear error and no archive.
    let mut child = capture_cmd(
        &d,
        &inc,
        &mode.args(&["--drive", "disk0", "--speed", "1048576"]),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    d.wait_for_job("vma-backup-0");
    std::thread::sleep(Duration::from_millis(500));
    drop(d);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!inc.exists());
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    assert!(
        mode.scratch_files().is_empty(),
        "{:?}",
        mode.scratch_files()
    );
}

/// Temporary archive files left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp") || n.contains("partial"))
        .collect()
}

#[test]
fn always_keeps_what_was_copied_and_the_retry_copies_only_the_rest() {
    always_keeps_what_was_copied(|_| Mode::plain());
}

#[test]
fn fleecing_always_keeps_what_was_copied_and_the_retry_copies_only_the_rest() {
    always_keeps_what_was_copied(Mode::fleecing);
}

fn always_keeps_what_was_copied(mode: fn(&Path) -> Mode) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mode = mode(dir.path());
    let (d, full) = one_disk_with_full(dir.path(), 7, &mode.args(&["--drive", "disk0"]));
    let nodes = d.node_names();
    d.guest_write("disk0", 0, 8 * 1024 * 1024, 0x55);

    // Interrupt a slow incremental in `always` mode.
    let inc = dir.path().join("inc.vma");
    let args = [
        "--drive",
        "disk0",
        "--bitmap-mode",
        "always",
        "--incremental-from",
        full.to_str().unwrap(),
    ];
    let child = capture_cmd(
        &d,
        &inc,
        &mode.args(&[&args[..], &["--speed", "1048576"]].concat()),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    d.wait_for_job("vma-backup-0");
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child's pid touches no memory.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    let partial = dir.path().join("inc.vma.partial");
    assert!(stderr(&out).contains("inc.vma.partial"), "{}", stderr(&out));
    mode.assert_clean(&d, &nodes);
    assert!(!inc.exists() && partial.exists());
    let copied = stored_clusters(&partial, "disk0");
    assert!(
        !copied.is_empty() && copied.len() < 128,
        "{} copied",
        copied.len()
    );
    assert!(copied.iter().all(|&c| c < 128));
    let r = Reader::open(&partial).unwrap();
    assert!(r.drive_records()[0].interrupted);
    // Neither restorable nor mountable on its own.
    let out = vma(&[
        "extract",
        partial.to_str().unwrap(),
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("interrupted capture"),
        "{}",
        stderr(&out)
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = vma(&["mount", partial.to_str().unwrap(), mnt.to_str().unwrap()]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("interrupted capture"),
        "{}",
        stderr(&out)
    );
    // The only bitmap left is the partial archive's checkpoint.
    let record = vma_tests::stdout(&vma(&[
        "config",
        partial.to_str().unwrap(),
        "vma-capture.json",
    ]));
    let bitmaps = d.bitmaps("disk0");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert!(record.contains(&bitmaps[0]));

    // The guest rewrites a copied cluster; the retry copies the rest and it.
    let rewritten = copied[0];
    d.guest_write("disk0", rewritten * CS, CS, 0x66);
    let retry = dir.path().join("retry.vma");
    run_capture(
        &d,
        &retry,
        &mode.args(&[
            "--drive",
            "disk0",
            "--incremental-from",
            partial.to_str().unwrap(),
        ]),
    );
    let mut want: Vec<u64> = (0..128).filter(|c| !copied.contains(c)).collect();
    want.push(rewritten);
    want.sort_unstable();
    assert_eq!(stored_clusters(&retry, "disk0"), want);
    assert!(restore(&[&full, &partial, &retry], "disk0") == d.contents("disk0"));
    let x = dir.path().join("x");
    let out = vma(&["extract", retry.to_str().unwrap(), x.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(x.join("disk0.raw")).unwrap() == d.contents("disk0"));
}

/// A fake guest agent on a unix socket: answers `guest-sync` and the
/// freeze commands (freeze fails when `fail_freeze`), and records every
/// command it receives.
fn fake_agent(path: &Path, fail_freeze: bool) -> std::thread::JoinHandle<Vec<String>> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut out = stream.try_clone().unwrap();
        let mut seen = Vec::new();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let msg: serde_json::Value = serde_json::from_str(&line).unwrap();
            let cmd = msg["execute"].as_str().unwrap().to_string();
            let reply = match cmd.as_str() {
                "guest-sync" => json!({"return": msg["arguments"]["id"]}),
                "guest-fsfreeze-freeze" if fail_freeze => {
                    json!({"error": {"class": "GenericError", "desc": "freeze is broken"}})
                }
                _ => json!({"return": 2}),
            };
            seen.push(cmd);
            writeln!(out, "{reply}").unwrap();
        }
        seen
    })
}

#[test]
fn fsfreeze_freezes_around_the_transaction_and_always_thaws() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.qcow2");
    make_qcow2(&img, 4 * 1024 * 1024, 8);
    let d = Daemon::start(dir.path(), &[("disk0", &img, "qcow2")]);

    let agent = dir.path().join("qga.sock");
    let seen = fake_agent(&agent, false);
    let archive = dir.path().join("a.vma");
    run_capture(
        &d,
        &archive,
        &["--drive", "disk0", "--fsfreeze", agent.to_str().unwrap()],
    );
    assert_eq!(
        seen.join().unwrap(),
        ["guest-sync", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    );
    assert!(restore(&[&archive], "disk0") == d.contents("disk0"));

    // A failing freeze: thawed anyway, no job started, no archive.
    std::fs::remove_file(&agent).unwrap();
    let seen = fake_agent(&agent, true);
    let archive = dir.path().join("b.vma");
    let out = capture_cmd(
        &d,
        &archive,
        &["--drive", "disk0", "--fsfreeze", agent.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("freeze is broken"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        seen.join().unwrap(),
        ["guest-sync", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    );
    assert!(!archive.exists());
    assert_eq!(d.qmp().run(&QueryJobs).unwrap(), vec![]);

    // Nothing started, so nothing was copied: with `always` too the base
    // bitmap stays, and the next capture is still incremental.
    let base = d.bitmaps("disk0");
    assert_eq!(base.len(), 1, "{base:?}");
    std::fs::remove_file(&agent).unwrap();
    let seen = fake_agent(&agent, true);
    let out = capture_cmd(
        &d,
        &archive,
        &[
            "--drive",
            "disk0",
            "--bitmap-mode",
            "always",
            "--incremental-from",
            dir.path().join("a.vma").to_str().unwrap(),
            "--fsfreeze",
            agent.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert_ne!(code(&out), 0);
    seen.join().unwrap();
    assert_eq!(d.bitmaps("disk0"), base, "{}", stderr(&out));
    let said = run_capture(
        &d,
        &archive,
        &[
            "--drive",
            "disk0",
            "--incremental-from",
            dir.path().join("a.vma").to_str().unwrap(),
        ],
    );
    assert!(
        !said.contains("full"),
        "the retry was not incremental: {said}"
    );
}

#[test]
fn a_full_disk_fails_the_nbd_writes_and_each_policy_leaves_its_bitmaps() {
    full_disk_fails_the_nbd_writes(|_| Mode::plain());
}

#[test]
fn fleecing_a_full_disk_fails_the_nbd_writes_and_each_policy_leaves_its_bitmaps() {
    full_disk_fails_the_nbd_writes(Mode::fleecing);
}

fn full_disk_fails_the_nbd_writes(how: fn(&Path) -> Mode) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let how = how(dir.path());
    let (d, full) = one_disk_with_full(
        dir.path(),
        9,
        &how.args(&["--drive", "disk0", "--compress", "none"]),
    );
    let nodes = d.node_names();
    let checkpoint = d.bitmaps("disk0");
    let small = SmallFs::new(&dir.path().join("small"), "2m");
    for mode in ["on-success", "never", "always"] {
        d.guest_write("disk0", 0, 8 * 1024 * 1024, 0x70);
        let archive = small.path().join(format!("{mode}.vma"));
        let out = capture_cmd(
            &d,
            &archive,
            &how.args(&[
                "--drive",
                "disk0",
                "--compress",
                "none",
                "--bitmap-mode",
                mode,
                "--incremental-from",
                full.to_str().unwrap(),
            ]),
        )
        .output()
        .unwrap();
        assert_ne!(code(&out), 0, "{mode}: {}", stderr(&out));
        let msg = stderr(&out);
        assert!(msg.contains("No space left on device"), "{mode}: {msg}");
        assert!(
            std::fs::read_dir(small.path()).unwrap().next().is_none(),
            "{mode}: files left on the full disk"
        );
        how.assert_clean(&d, &nodes);
        if mode == "always" && !how.is_fleecing() {
            // What was copied could not be kept: the base bitmap no longer
            // describes the change since the parent and is gone, so the
            // next capture of the drive is full.
            assert!(d.bitmaps("disk0").is_empty(), "{:?}", d.bitmaps("disk0"));
        } else {
            // With fleecing QEMU only changed a frozen copy of the base,
            // so in `always` mode too it still holds everything since the
            // parent.
            assert_eq!(d.bitmaps("disk0"), checkpoint, "{mode}");
        }
    }
    let next = dir.path().join("next.vma");
    let msg = run_capture(
        &d,
        &next,
        &how.args(&[
            "--drive",
            "disk0",
            "--incremental-from",
            full.to_str().unwrap(),
        ]),
    );
    if how.is_fleecing() {
        assert!(msg.contains("incremental backup"), "{msg}");
        assert_eq!(
            stored_clusters(&next, "disk0"),
            (0..128).collect::<Vec<_>>()
        );
        assert!(restore(&[&full, &next], "disk0") == d.contents("disk0"));
    } else {
        assert!(msg.contains("full backup (bitmap"), "{msg}");
        assert!(restore(&[&next], "disk0") == d.contents("disk0"));
    }
}

#[test]
fn a_chain_of_six_restores_every_point_and_merges_into_a_synthetic_full() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (d, full) = one_disk_with_full(dir.path(), 10, &["--drive", "disk0"]);
    let mut points = vec![(full.clone(), d.contents("disk0"))];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 1..6 {
        for _ in 0..(next() % 6 + 1) {
            // Random 512-byte aligned writes of up to 200 KiB.
            let len = (next() % 400 + 1) * 512;
            let offset = (next() % (16 * 1024 * 1024 - len)) / 512 * 512;
            d.guest_write("disk0", offset, len, (next() % 255 + 1) as u8);
        }
        let archive = dir.path().join(format!("{i}.vma"));
        let parent = points.last().unwrap().0.clone();
        run_capture(
            &d,
            &archive,
            &[
                "--drive",
                "disk0",
                "--incremental-from",
                parent.to_str().unwrap(),
            ],
        );
        points.push((archive, d.contents("disk0")));
    }
    for (i, (archive, want)) in points.iter().enumerate() {
        let x = dir.path().join(format!("x{i}"));
        let out = vma(&["extract", archive.to_str().unwrap(), x.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            std::fs::read(x.join("disk0.raw")).unwrap() == *want,
            "point {i}"
        );
    }
    let newest = &points.last().unwrap().0;
    // verify checks every link of the chain; a damaged ancestor fails it.
    let out = vma(&["verify", "--json", newest.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&vma_tests::stdout(&out)).unwrap();
    assert_eq!(doc["chain"].as_array().unwrap().len(), 5);
    let middle = &points[2].0;
    let saved = std::fs::read(middle).unwrap();
    let mut bad = saved.clone();
    bad[4096] ^= 0x40;
    std::fs::write(middle, &bad).unwrap();
    let out = vma(&["verify", newest.to_str().unwrap()]);
    assert_eq!(code(&out), 1, "{}{}", vma_tests::stdout(&out), stderr(&out));
    assert!(
        vma_tests::stdout(&out).contains("ancestor"),
        "{}",
        vma_tests::stdout(&out)
    );
    std::fs::write(middle, &saved).unwrap();
    let listed = vma(&["list", "--json", "--chain", newest.to_str().unwrap()]);
    assert_eq!(code(&listed), 0, "{}", stderr(&listed));
    let doc: serde_json::Value = serde_json::from_str(&vma_tests::stdout(&listed)).unwrap();
    let links = doc["chain"].as_array().unwrap();
    assert_eq!(links.len(), 6);
    assert_eq!(links[5]["incremental"], json!(false));
    assert!(links[..5].iter().all(|l| l["incremental"] == json!(true)));
    let merged = dir.path().join("merged.vma");
    let out = vma(&[
        "merge",
        newest.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = Reader::open(&merged).unwrap();
    assert!(r.header().parent.is_none());
    let mut got = vec![0u8; 16 * 1024 * 1024];
    r.read_at(DriveId(1), 0, &mut got).unwrap();
    assert!(
        got == points.last().unwrap().1,
        "the synthetic full differs from the newest point"
    );
    let out = vma(&["verify", merged.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        vma_tests::stdout(&out).contains("match") || stderr(&out).contains("match"),
        "{}{}",
        vma_tests::stdout(&out),
        stderr(&out)
    );
    // The merged archive keeps the checkpoint: a capture continues from it.
    d.guest_write("disk0", 5 * CS, 3 * CS, 0x99);
    let after = dir.path().join("after-merge.vma");
    run_capture(
        &d,
        &after,
        &[
            "--drive",
            "disk0",
            "--incremental-from",
            merged.to_str().unwrap(),
        ],
    );
    assert_eq!(stored_clusters(&after, "disk0"), vec![5, 6, 7]);
    let x = dir.path().join("x-after");
    let out = vma(&["extract", after.to_str().unwrap(), x.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(x.join("disk0.raw")).unwrap() == d.contents("disk0"));
}

#[test]
fn a_diff_stores_what_a_bitmap_incremental_stores() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (d, full) = one_disk_with_full(dir.path(), 11, &["--drive", "disk0"]);
    for (offset, len, pattern) in [
        (0, CS, 1u8),
        (7 * CS + 512, 3 * CS, 2),
        (200 * CS, 512, 3),
        (255 * CS, CS, 4),
    ] {
        d.guest_write("disk0", offset, len, pattern);
    }
    let inc = dir.path().join("inc.vma");
    run_capture(
        &d,
        &inc,
        &[
            "--drive",
            "disk0",
            "--incremental-from",
            full.to_str().unwrap(),
        ],
    );
    let now = d.contents("disk0");
    // Stop QEMU cleanly, then compare its image file with the full archive.
    d.qmp().run(&Quit).unwrap();
    drop(d);
    let img = dir.path().join("disk0.qcow2");
    let diff = dir.path().join("diff.vma");
    run_diff(&full, &img, &diff);
    assert_eq!(
        stored_clusters(&diff, "disk0"),
        stored_clusters(&inc, "disk0")
    );
    assert_eq!(
        stored_clusters(&diff, "disk0"),
        vec![0, 7, 8, 9, 10, 200, 255]
    );
    let x = dir.path().join("x");
    let out = vma(&["extract", diff.to_str().unwrap(), x.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(x.join("disk0.raw")).unwrap() == now);
    // Nothing changed since: a second diff stores nothing.
    let again = dir.path().join("again.vma");
    run_diff(&diff, &img, &again);
    assert!(stored_clusters(&again, "disk0").is_empty());
}

/// `vma diff --against parent disk0=image -o output`, which must succeed.
fn run_diff(parent: &Path, image: &Path, output: &Path) {
    let out = vma(&[
        "diff",
        "--against",
        parent.to_str().unwrap(),
        &format!("disk0={}", image.display()),
        "-o",
        output.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// Clusters in which `a` and `b` differ.
fn differing_clusters(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(CS as usize)
        .zip(b.chunks(CS as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// `vma create ARCHIVE disk0=RAW` of a copy of what the guest sees now.
fn full_from_a_copy(dir: &Path, contents: &[u8]) -> PathBuf {
    let copy = dir.join("copy.raw");
    std::fs::write(&copy, contents).unwrap();
    let full = dir.join("full.vma");
    let out = vma(&[
        "create",
        full.to_str().unwrap(),
        &format!("disk0={}", copy.display()),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    full
}

/// Scratch images left in `dir` (the default scratch directory of
/// `--diff-against` is the archive's).
fn scratch_images(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vma-scratch"))
        .collect()
}

#[test]
fn diff_against_a_full_without_bitmaps_while_the_guest_writes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * 1024 * 1024;
    let img = dir.path().join("disk0.qcow2");
    make_qcow2(&img, size, 13);
    let d = Daemon::start(dir.path(), &[("disk0", &img, "qcow2")]);
    let nodes = d.node_names();
    let exports = d.exports();
    let original = d.contents("disk0");
    let full = full_from_a_copy(dir.path(), &original);
    assert!(d.bitmaps("disk0").is_empty());

    // Writes since the copy: new data, zeros over data, and zeros over a
    // cluster that was zero already (no difference).
    rewrite(&d, [2, 3, 100, 101, 102, 400, 511], 0x41);
    let zero_before = (200..512u64).find(|&c| (c * 7 + 13) % 3 == 0).unwrap();
    let data_before = (0..512u64)
        .find(|&c| (c * 7 + 13) % 3 != 0 && c > 200)
        .unwrap();
    rewrite(&d, [zero_before, data_before], 0);
    let point = d.contents("disk0");
    let changed = differing_clusters(&original, &point);
    assert!(changed.contains(&data_before) && !changed.contains(&zero_before));
    assert_eq!(changed.len(), 8, "{changed:?}");

    // The diff reads the view at 4 MiB/s while the guest keeps writing,
    // also where the diff has not read yet.
    let diff = dir.path().join("diff.vma");
    let mut job = capture_cmd(
        &d,
        &diff,
        &[
            "--drive",
            "disk0",
            "--diff-against",
            full.to_str().unwrap(),
            "--qemu-nbd-socket",
            d.guest_socket().to_str().unwrap(),
            "--speed",
            "4194304",
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    d.wait_for_job("vma-fleece-0");
    let during = rewrite(&d, [1, 100, 300, 500, 501], 0x42);
    assert!(
        job.try_wait().unwrap().is_none(),
        "the diff ended before the guest's writes"
    );
    let out = job.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("8 clusters"), "{}", stderr(&out));
    assert_eq!(d.node_names(), nodes);
    assert_eq!(d.exports(), exports);
    d.assert_no_jobs();
    assert!(scratch_images(dir.path()).is_empty());

    // Only the clusters that differ, with the full as parent; through the
    // chain it is exactly the point in time.
    assert_eq!(stored_clusters(&diff, "disk0"), changed);
    let r = Reader::open(&diff).unwrap();
    let parent = r.header().parent.expect("a parent");
    assert_eq!(parent.uuid, Reader::open(&full).unwrap().header().uuid);
    let x = dir.path().join("x");
    let out = vma(&["extract", diff.to_str().unwrap(), x.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        std::fs::read(x.join("disk0.raw")).unwrap() == point,
        "the diff is not the disk at its point in time"
    );
    let record = vma_tests::stdout(&vma(&[
        "config",
        diff.to_str().unwrap(),
        "vma-capture.json",
    ]));
    assert!(record.contains("\"incremental\""), "{record}");
    let bitmaps = d.bitmaps("disk0");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert!(record.contains(&bitmaps[0]), "{record}");

    // The chain goes on with bitmaps: exactly what the guest wrote since.
    let now = d.contents("disk0");
    let inc = dir.path().join("inc.vma");
    let msg = run_capture(
        &d,
        &inc,
        &[
            "--drive",
            "disk0",
            "--incremental-from",
            diff.to_str().unwrap(),
        ],
    );
    assert!(msg.contains("incremental backup"), "{msg}");
    assert_eq!(stored_clusters(&inc, "disk0"), during);
    let y = dir.path().join("y");
    let out = vma(&["extract", inc.to_str().unwrap(), y.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(y.join("disk0.raw")).unwrap() == now);
}

/// Whether `nbd-server-start` works on the daemon (no server runs); the
/// server started is stopped again.
fn nbd_server_free(d: &Daemon, dir: &Path) -> bool {
    let qmp = d.qmp();
    let path = dir.join("probe.sock");
    let started = qmp.run(&NbdServerStart {
        addr: SocketAddressLegacy::Unix(UnixSocketAddress { path }),
    });
    if started.is_ok() {
        qmp.run(&NbdServerStop).unwrap();
    }
    started.is_ok()
}

#[test]
fn diff_against_runs_qemus_nbd_server_and_undoes_everything_on_refusal_and_cancel() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.qcow2");
    make_qcow2(&img, 16 * 1024 * 1024, 14);

    // QEMU runs an NBD server already and none is named: refused, and
    // nothing is left behind.
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    let d = Daemon::start(&busy, &[("disk0", &img, "qcow2")]);
    let nodes = d.node_names();
    let original = d.contents("disk0");
    let full = full_from_a_copy(dir.path(), &original);
    let archive = dir.path().join("refused.vma");
    let out = capture_cmd(
        &d,
        &archive,
        &["--drive", "disk0", "--diff-against", full.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("--qemu-nbd-socket"),
        "{}",
        stderr(&out)
    );
    assert!(!archive.exists());
    assert_eq!(d.node_names(), nodes);
    assert!(d.bitmaps("disk0").is_empty(), "{:?}", d.bitmaps("disk0"));
    assert_eq!(d.exports(), ["disk0-exp"]);
    assert!(scratch_images(dir.path()).is_empty());
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    drop(d);

    // No NBD server: vma starts QEMU's and stops it again.
    let idle = dir.path().join("idle");
    std::fs::create_dir(&idle).unwrap();
    let d = Daemon::start_without_nbd(&idle, &[("disk0", &img, "qcow2")]);
    let nodes = d.node_names();
    let mode = Mode::fleecing(dir.path());
    let diff = dir.path().join("diff.vma");
    let msg = run_capture(
        &d,
        &diff,
        &mode.args(&["--drive", "disk0", "--diff-against", full.to_str().unwrap()]),
    );
    assert!(msg.contains("0 clusters (0 B) differ"), "{msg}");
    mode.assert_clean(&d, &nodes);
    assert!(
        nbd_server_free(&d, &idle),
        "QEMU's NBD server was left running"
    );
    assert!(d.exports().is_empty());
    assert!(stored_clusters(&diff, "disk0").is_empty());
    let checkpoint = d.bitmaps("disk0");
    assert_eq!(checkpoint.len(), 1);

    // Ctrl-C half-way: no archive, no new bitmap, nothing left in QEMU.
    let cancelled = dir.path().join("cancelled.vma");
    let child = capture_cmd(
        &d,
        &cancelled,
        &mode.args(&[
            "--drive",
            "disk0",
            "--diff-against",
            diff.to_str().unwrap(),
            "--speed",
            "1048576",
        ]),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    d.wait_for_job("vma-fleece-0");
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill(2) on our own child's pid touches no memory.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("cancelled"), "{}", stderr(&out));
    assert!(!cancelled.exists());
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    mode.assert_clean(&d, &nodes);
    assert_eq!(d.bitmaps("disk0"), checkpoint);
    assert!(d.exports().is_empty());
    assert!(
        nbd_server_free(&d, &idle),
        "QEMU's NBD server was left running"
    );
}

#[test]
fn fleecing_a_full_scratch_fails_the_guests_write_not_the_point_in_time() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = one_disk_with_full(dir.path(), 15, &["--drive", "disk0"]);
    let nodes = d.node_names();
    let before = d.contents("disk0");
    // A scratch directory with room for 1 MiB of old data.
    let small = SmallFs::new(&dir.path().join("small"), "1m");
    let mode = Mode(Some(small.path().to_path_buf()));
    let archive = dir.path().join("a.vma");
    let job = capture_cmd(
        &d,
        &archive,
        &mode.args(&["--drive", "disk0", "--speed", "2097152"]),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    d.wait_for_job("vma-backup-0");
    // 4 MiB of data the job has not copied yet: their old contents do not
    // fit, and the filter fails the guest's write (break-guest-write).
    let uri = format!("nbd+unix:///disk0?socket={}", d.guest_socket().display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x5e 8M 4M"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    assert!(said.contains("No space left on device"), "{said}");
    let out = job.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    mode.assert_clean(&d, &nodes);
    // The failed write changed nothing; the archive is the point in time.
    assert!(d.contents("disk0") == before);
    assert!(restore(&[&archive], "disk0") == before);
    // The drive works on.
    d.guest_write("disk0", 8 << 20, 4 << 20, 0x5f);
    assert!(d.contents("disk0")[8 << 20..12 << 20]
        .iter()
        .all(|&b| b == 0x5f));
}

/// SIGKILL at random moments of a capture (it cannot clean up) never
/// leaves a file under the archive's name that is not a complete archive
/// of the drive as it was; and the next capture, after each kill, works.
#[test]
fn a_killed_capture_never_leaves_an_incomplete_archive_and_the_next_one_works() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.qcow2");
    make_qcow2(&img, 16 * 1024 * 1024, 9);
    let d = Daemon::start(dir.path(), &[("disk0", &img, "qcow2")]);
    let nodes = d.node_names();
    let expected = {
        let full = dir.path().join("reference.vma");
        run_capture(&d, &full, &["--drive", "disk0"]);
        restore(&[&full], "disk0")
    };
    let archive = dir.path().join("killed.vma");
    let mut seed = std::process::id() as u64 | 1;
    let (mut cut_short, mut cleared) = (0, 0);
    for round in 0..6 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Every other round with fleecing: its scratch image is left too.
        let mode = if round % 2 == 1 {
            Mode::fleecing(dir.path())
        } else {
            Mode::plain()
        };
        // 8 MiB/s: the 16 MiB disk takes about two seconds.
        let delay = Duration::from_millis(100 + seed % 1900);
        let mut child = capture_cmd(
            &d,
            &archive,
            &mode.args(&["--drive", "disk0", "--speed", "8388608"]),
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        std::thread::sleep(delay);
        let killed_early = child.try_wait().unwrap().is_none();
        cut_short += killed_early as usize;
        let _ = child.kill();
        let _ = child.wait();
        if archive.exists() {
            assert_eq!(
                restore(&[&archive], "disk0"),
                expected,
                "round {round}: killed after {delay:?}, the archive is not the disk"
            );
            std::fs::remove_file(&archive).unwrap();
        }
        // The next capture cleans up what the killed one left in QEMU.
        let next = dir.path().join(format!("next-{round}.vma"));
        let said = run_capture(&d, &next, &["--drive", "disk0"]);
        cleared += said.contains("removed what an earlier capture") as usize;
        assert!(
            mode.scratch_files().is_empty(),
            "round {round}: {:?}",
            mode.scratch_files()
        );
        assert_eq!(restore(&[&next], "disk0"), expected, "round {round}");
        std::fs::remove_file(&next).unwrap();
        assert_eq!(
            d.node_names(),
            nodes,
            "round {round}: block nodes left behind"
        );
        d.assert_no_jobs();
    }
    assert!(
        cut_short >= 3,
        "only {cut_short} of 6 captures were killed before finishing"
    );
    // (A capture killed before it added anything leaves nothing to clear.)
    assert!(
        cleared >= 1,
        "no capture had to clear what a killed one left"
    );
}

/// A capture through a second monitor of a QEMU where one is running is
/// refused, and touches nothing of the running one.
#[test]
fn a_capture_is_refused_while_another_runs_on_the_same_qemu() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.qcow2");
    make_qcow2(&img, 16 * 1024 * 1024, 4);
    let d = Daemon::start(dir.path(), &[("disk0", &img, "qcow2")]);
    let first = dir.path().join("first.vma");
    let running = capture_cmd(&d, &first, &["--drive", "disk0", "--speed", "4194304"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_for_job("vma-backup-0");
    let second = dir.path().join("second.vma");
    let out = Command::new(vma_bin())
        .arg("capture")
        .arg("--qmp")
        .arg(dir.path().join("test-qmp.sock"))
        .arg(&second)
        .args(["--drive", "disk0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another vma capture is running"),
        "{}",
        stderr(&out)
    );
    assert!(!second.exists());
    let out = running.wait_with_output().unwrap();
    assert_eq!(
        code(&out),
        0,
        "the running capture failed: {}",
        stderr(&out)
    );
    assert!(first.exists());
}

/// QEMU's notice, once per backup job, that it cannot learn the target's
/// cluster size: QEMU's NBD client driver cannot report one, whatever the
/// server announces (see the README's `capture` section).
fn is_cluster_size_notice(line: &str) -> bool {
    line.starts_with(
        "warning: The target block device doesn't provide information about the block size",
    ) && line.ends_with("the backup may be unusable")
}

/// Whatever QEMU logs about a capture (full and incremental, with and
/// without fleecing) is that notice and nothing else: the capture target's
/// sizes, alignment and replies give QEMU nothing to warn about.
#[test]
fn qemu_logs_nothing_of_a_capture_but_its_cluster_size_notice() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.qcow2");
    // Not a multiple of 64 KiB: the last cluster is short.
    make_qcow2(&img, 4 * 1024 * 1024 + 4096, 21);
    let log = dir.path().join("qemu.log");
    let d = Daemon::start_logged(dir.path(), &[("disk0", &img, "qcow2")], &log);
    let full = dir.path().join("full.vma");
    run_capture(&d, &full, &["--drive", "disk0"]);
    let scratch = Mode::fleecing(dir.path());
    let inc = dir.path().join("inc.vma");
    let args = scratch.args(&[
        "--drive",
        "disk0",
        "--incremental-from",
        full.to_str().unwrap(),
    ]);
    run_capture(&d, &inc, &args);
    drop(d);
    let text = std::fs::read_to_string(&log).unwrap();
    let notices = text.lines().filter(|l| is_cluster_size_notice(l)).count();
    let other: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_cluster_size_notice(l))
        .collect();
    assert!(other.is_empty(), "QEMU logged: {other:#?}");
    // One notice per backup job at most (the fleecing job's target is a
    // qcow2 scratch image, which reports its cluster size).
    assert!(notices <= 2, "{text}");
}

/// Incremental captures carry the VM configs of their parent's point in
/// time (also when the parent, written before configs were carried, stores
/// none itself) unless new ones are given; the capture record stays each
/// capture's own.
#[test]
fn incremental_captures_carry_the_vm_config_forward() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("qemu-server.conf");
    std::fs::write(&conf, b"cores: 4\n").unwrap();
    let (d, full) = one_disk_with_full(
        dir.path(),
        21,
        &["--drive", "disk0", "--config", conf.to_str().unwrap()],
    );
    let config = |archive: &Path, name: &str| {
        let o = vma(&["config", archive.to_str().unwrap(), name]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        o.stdout
    };
    let names = |archive: &Path| {
        let o = vma(&["config", "--list", archive.to_str().unwrap()]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stdout(&o)
    };
    let stored = |archive: &Path| {
        let r = Reader::open(archive).unwrap();
        r.header()
            .configs
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };

    // --incremental-from: the parent's configs, stored in the new archive.
    d.guest_write("disk0", 3 * CS, CS, 0x51);
    let inc1 = dir.path().join("inc1.vma");
    run_capture(
        &d,
        &inc1,
        &[
            "--drive",
            "disk0",
            "--incremental-from",
            full.to_str().unwrap(),
        ],
    );
    assert_eq!(stored(&inc1), ["qemu-server.conf", "vma-capture.json"]);
    assert_eq!(config(&inc1, "qemu-server.conf"), b"cores: 4\n");
    assert_ne!(
        config(&inc1, "vma-capture.json"),
        config(&full, "vma-capture.json"),
        "the capture record is the capture's own"
    );

    // A parent that stores no VM config (as incrementals were written
    // before): its ancestor's configs go forward.
    let old = dir.path().join("old.vma");
    without_configs(&inc1, &old);
    std::fs::rename(&old, &inc1).unwrap();
    assert_eq!(stored(&inc1), ["vma-capture.json"]);
    assert_eq!(names(&inc1), "qemu-server.conf\nvma-capture.json\n");
    d.guest_write("disk0", 5 * CS, CS, 0x52);
    let inc2 = dir.path().join("inc2.vma");
    run_capture(
        &d,
        &inc2,
        &[
            "--drive",
            "disk0",
            "--incremental-from",
            inc1.to_str().unwrap(),
        ],
    );
    assert_eq!(stored(&inc2), ["qemu-server.conf", "vma-capture.json"]);
    assert_eq!(config(&inc2, "qemu-server.conf"), b"cores: 4\n");

    // --diff-against: new configs replace them; without, they go forward.
    let new = dir.path().join("new.conf");
    std::fs::write(&new, b"cores: 8\n").unwrap();
    d.guest_write("disk0", 7 * CS, CS, 0x53);
    let inc3 = dir.path().join("inc3.vma");
    run_capture(
        &d,
        &inc3,
        &[
            "--drive",
            "disk0",
            "--diff-against",
            inc2.to_str().unwrap(),
            "--qemu-nbd-socket",
            d.guest_socket().to_str().unwrap(),
            "--config",
            &format!("qemu-server.conf={}", new.display()),
        ],
    );
    assert_eq!(stored(&inc3), ["qemu-server.conf", "vma-capture.json"]);
    assert_eq!(config(&inc3, "qemu-server.conf"), b"cores: 8\n");
    d.guest_write("disk0", 9 * CS, CS, 0x54);
    let inc4 = dir.path().join("inc4.vma");
    run_capture(
        &d,
        &inc4,
        &[
            "--drive",
            "disk0",
            "--diff-against",
            inc3.to_str().unwrap(),
            "--qemu-nbd-socket",
            d.guest_socket().to_str().unwrap(),
        ],
    );
    assert_eq!(stored(&inc4), ["qemu-server.conf", "vma-capture.json"]);
    assert_eq!(config(&inc4, "qemu-server.conf"), b"cores: 8\n");
    // The restored point in time has its configs.
    let out = dir.path().join("x");
    let o = vma(&[
        "extract",
        "-q",
        inc4.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("qemu-server.conf")).unwrap(),
        b"cores: 8\n"
    );
}

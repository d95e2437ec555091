//! QMP client against a real `qemu-storage-daemon`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vma_capture::qmp::{
    BitmapSource, BlockDeviceInfo, BlockDirtyBitmapAdd, BlockDirtyBitmapClear,
    BlockDirtyBitmapDisable, BlockDirtyBitmapEnable, BlockDirtyBitmapMerge, BlockDirtyBitmapRemove,
    BlockdevAdd, BlockdevBackup, BlockdevDel, BlockdevOptions, BlockdevRef, Command as QmpCommand,
    Driver, Error, Event, JobCancel, JobDismiss, JobFinalize, JobStatus, QemuVersion, Qmp,
    QueryBlock, QueryJobs, QueryNamedBlockNodes, QueryVersion, SyncMode, Transaction,
};

/// A command QEMU does not have.
#[derive(serde::Serialize)]
struct NoSuchCommand;

impl QmpCommand for NoSuchCommand {
    const NAME: &'static str = "no-such-command";
    type Reply = Value;
}

/// `query-jobs` with arguments of the wrong type.
#[derive(serde::Serialize)]
struct QueryJobsWithString(&'static str);

impl QmpCommand for QueryJobsWithString {
    const NAME: &'static str = "query-jobs";
    type Reply = Value;
}

/// `query-version`, its reply decoded as the wrong type.
#[derive(serde::Serialize)]
struct QueryVersionAsBytes;

impl QmpCommand for QueryVersionAsBytes {
    const NAME: &'static str = "query-version";
    type Reply = Vec<u8>;
}

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

/// A `qemu-storage-daemon` with its QMP monitor on a unix socket in a
/// temporary directory; killed when dropped.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("create temp dir");
        let socket = dir.path().join("qmp.sock");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("create log");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=mon,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["--monitor", "chardev=mon"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run qemu-storage-daemon ({e}); \
                     install qemu-utils (Debian/Ubuntu: apt install qemu-utils)"
                )
            });
        Daemon { child, dir, socket }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Connects once the daemon listens.
    fn connect(&mut self) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Qmp::connect(&self.socket) {
                Ok(qmp) => return qmp,
                Err(Error::Connect { .. }) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!(
                            "qemu-storage-daemon exited with {status}: {}",
                            self.stderr()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!(
                    "cannot connect to qemu-storage-daemon: {e}\n{}",
                    self.stderr()
                ),
            }
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Creates a qcow2 image in the temporary directory.
    fn qcow2(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let output = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg(size.to_string())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run qemu-img ({e}); install qemu-utils (Debian/Ubuntu: apt install qemu-utils)"
                )
            });
        assert!(
            output.status.success(),
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        path
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Adds a qcow2 image as file node `<node>-file` plus qcow2 node `node`.
fn add_qcow2(qmp: &Qmp, node: &str, path: &Path) {
    let file_node = format!("{node}-file");
    let filename = path.to_path_buf();
    qmp.run(&BlockdevAdd(BlockdevOptions::new(
        &file_node,
        Driver::File { filename },
    )))
    .expect("add file node");
    let file = BlockdevRef::Node(file_node);
    qmp.run(&BlockdevAdd(BlockdevOptions::new(
        node,
        Driver::Qcow2 { file },
    )))
    .expect("add qcow2 node");
}

fn add_null(qmp: &Qmp, node: &str, size: u64) {
    qmp.run(&BlockdevAdd(BlockdevOptions::new(
        node,
        Driver::NullCo { size },
    )))
    .expect("add null-co node");
}

fn del(node_name: &str) -> BlockdevDel {
    BlockdevDel {
        node_name: node_name.to_owned(),
    }
}

/// Merge bitmap `source` of `node` into its bitmap `target`.
fn merge(node: &str, target: &str, source: &str) -> BlockDirtyBitmapMerge {
    BlockDirtyBitmapMerge {
        node: node.into(),
        target: target.into(),
        bitmaps: vec![BitmapSource::Local(source.into())],
    }
}

fn node(qmp: &Qmp, name: &str) -> BlockDeviceInfo {
    qmp.run(&QueryNamedBlockNodes { flat: true })
        .expect("query-named-block-nodes")
        .into_iter()
        .find(|n| n.node_name == name)
        .unwrap_or_else(|| panic!("node {name} not listed"))
}

fn is_status(event: &Event, job: &str, status: JobStatus) -> bool {
    event
        .job_status_change()
        .is_some_and(|c| c.id == job && c.status == status)
}

#[test]
fn connects_and_reports_version() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();

    let output = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .expect("qemu-storage-daemon --version");
    let text = String::from_utf8_lossy(&output.stdout);
    let number = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .expect("version in --version output");
    let parts: Vec<u32> = number.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(
        qmp.version(),
        QemuVersion::new(parts[0], parts[1], parts[2]),
        "{text}"
    );
    assert!(qmp.version() >= QemuVersion::new(5, 0, 0));
    assert!(qmp.is_connected());
    // A command with a reply of its own.
    let reply = qmp.run(&QueryVersion).unwrap();
    assert_eq!(reply.qemu.major, parts[0]);
}

#[test]
fn adds_qcow2_nodes_and_reports_size() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();
    let image = daemon.qcow2("disk.qcow2", 64 * MIB);
    add_qcow2(&qmp, "disk0", &image);

    let disk = node(&qmp, "disk0");
    assert_eq!(disk.drv, "qcow2");
    assert_eq!(disk.image.virtual_size, 64 * MIB);
    assert_eq!(disk.image.format, "qcow2");
    assert_eq!(disk.image.filename, image.to_str().unwrap());
    assert_eq!(disk.image.cluster_size, Some(65536));
    assert!(!disk.ro);
    let file = node(&qmp, "disk0-file");
    assert_eq!(file.drv, "file");
    assert_eq!(file.file, image.to_str().unwrap());

    // The daemon has no guest devices, but the reply must decode.
    assert!(qmp.run(&QueryBlock).unwrap().is_empty());

    qmp.run(&del("disk0")).unwrap();
    qmp.run(&del("disk0-file")).unwrap();
    let names: Vec<String> = qmp
        .run(&QueryNamedBlockNodes { flat: true })
        .unwrap()
        .into_iter()
        .map(|n| n.node_name)
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn error_reply_carries_class_and_desc() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();

    match qmp.run(&del("no-such-node")) {
        Err(Error::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "blockdev-del");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("no-such-node"), "{desc}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    match qmp.run(&NoSuchCommand) {
        Err(Error::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("expected a command error, got {other:?}"),
    }
    match qmp.run(&QueryJobsWithString("not an object")) {
        Err(Error::Command { class, .. }) => assert_eq!(class, "GenericError"),
        other => panic!("expected a command error, got {other:?}"),
    }
    // A reply of the wrong shape is a decode error, not a panic.
    assert!(matches!(
        qmp.run(&QueryVersionAsBytes),
        Err(Error::Decode { .. })
    ));
    // The connection is still fine.
    assert!(qmp.run(&QueryJobs).unwrap().is_empty());
}

#[test]
fn dirty_bitmaps_show_in_node_query() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();
    let image = daemon.qcow2("disk.qcow2", 64 * MIB);
    add_qcow2(&qmp, "disk0", &image);

    qmp.run(&BlockDirtyBitmapAdd {
        persistent: Some(false),
        ..BlockDirtyBitmapAdd::new("disk0", "b0")
    })
    .unwrap();
    qmp.run(&Transaction::new().with(&BlockDirtyBitmapAdd {
        disabled: Some(true),
        granularity: Some(128 * 1024),
        ..BlockDirtyBitmapAdd::new("disk0", "b1")
    }))
    .unwrap();

    let bitmaps = node(&qmp, "disk0").dirty_bitmaps.expect("dirty-bitmaps");
    let b0 = bitmaps.iter().find(|b| b.name == "b0").unwrap();
    assert!(b0.recording && !b0.persistent && !b0.busy && !b0.inconsistent);
    assert_eq!(b0.count, 0);
    assert_eq!(b0.granularity, 65536);
    let b1 = bitmaps.iter().find(|b| b.name == "b1").unwrap();
    assert!(!b1.recording);
    assert_eq!(b1.granularity, 128 * 1024);

    qmp.run(&BlockDirtyBitmapEnable::new("disk0", "b1"))
        .unwrap();
    qmp.run(&BlockDirtyBitmapDisable::new("disk0", "b0"))
        .unwrap();
    let bitmaps = node(&qmp, "disk0").dirty_bitmaps.unwrap();
    for bitmap in &bitmaps {
        let expect_recording = bitmap.name == "b1";
        assert_eq!(bitmap.recording, expect_recording, "{bitmap:?}");
    }

    assert!(matches!(
        qmp.run(&merge("disk0", "b1", "no-such-bitmap")),
        Err(Error::Command { .. })
    ));
    qmp.run(&BlockDirtyBitmapAdd::new("disk0", "b2")).unwrap();
    qmp.run(&merge("disk0", "b2", "b0")).unwrap();
    qmp.run(&BlockDirtyBitmapClear::new("disk0", "b2")).unwrap();

    qmp.run(
        &Transaction::new()
            .with(&BlockDirtyBitmapRemove::new("disk0", "b0"))
            .with(&BlockDirtyBitmapRemove::new("disk0", "b1")),
    )
    .unwrap();
    qmp.run(&BlockDirtyBitmapRemove::new("disk0", "b2"))
        .unwrap();
    let left = node(&qmp, "disk0").dirty_bitmaps.unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn concurrent_execute_gets_own_replies() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();
    add_null(&qmp, "shared", 64 * MIB);

    std::thread::scope(|s| {
        for t in 0..4 {
            let qmp = &qmp;
            s.spawn(move || {
                for i in 0..50 {
                    if i % 2 == 0 {
                        let missing = format!("gone-{t}-{i}");
                        match qmp.run(&del(&missing)) {
                            Err(Error::Command { desc, .. }) => {
                                assert!(desc.contains(&format!("'{missing}'")), "{desc}")
                            }
                            other => panic!("expected a command error, got {other:?}"),
                        }
                    } else {
                        let name = format!("bm-{t}-{i}");
                        qmp.run(&BlockDirtyBitmapAdd::new("shared", &name)).unwrap();
                    }
                }
            });
        }
    });

    let names: BTreeSet<String> = node(&qmp, "shared")
        .dirty_bitmaps
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    let expected: BTreeSet<String> = (0..4)
        .flat_map(|t| (1..50).step_by(2).map(move |i| format!("bm-{t}-{i}")))
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn backup_job_events_arrive_in_order() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();
    let image = daemon.qcow2("disk.qcow2", 64 * MIB);
    add_qcow2(&qmp, "src", &image);
    add_null(&qmp, "target", 64 * MIB);

    let backup = BlockdevBackup {
        auto_finalize: Some(false),
        auto_dismiss: Some(false),
        filter_node_name: Some("cbw0".into()),
        ..BlockdevBackup::new("job0", "src", "target", SyncMode::Full)
    };
    qmp.run(&Transaction::new().with(&backup)).unwrap();

    // Waiting for BLOCK_JOB_PENDING passes over the status changes before
    // it; they stay queued, in order.
    let pending = qmp
        .wait_event(WAIT, |e| e.name == Event::BLOCK_JOB_PENDING)
        .unwrap();
    let pending = pending.block_job().expect("BLOCK_JOB_PENDING payload");
    assert_eq!(pending.job_id(), Some("job0"));
    assert_eq!(pending.job_type.as_deref(), Some("backup"));

    let mut statuses = Vec::new();
    while let Some(event) = qmp.next_event(Duration::from_millis(200)).unwrap() {
        let change = event
            .job_status_change()
            .unwrap_or_else(|| panic!("unexpected event {event:?}"));
        assert_eq!(change.id, "job0");
        statuses.push(change.status);
    }
    assert_eq!(statuses.first(), Some(&JobStatus::Created), "{statuses:?}");
    assert!(statuses.contains(&JobStatus::Running), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&JobStatus::Pending), "{statuses:?}");

    let jobs = qmp.run(&QueryJobs).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, "job0");
    assert_eq!(jobs[0].job_type, "backup");
    assert_eq!(jobs[0].status, JobStatus::Pending);
    assert_eq!(jobs[0].current_progress, 64 * MIB);
    assert_eq!(jobs[0].total_progress, 64 * MIB);
    assert_eq!(jobs[0].error, None);

    qmp.run(&JobFinalize::new("job0")).unwrap();
    let completed = qmp
        .wait_event(WAIT, |e| e.name == Event::BLOCK_JOB_COMPLETED)
        .unwrap()
        .block_job()
        .expect("BLOCK_JOB_COMPLETED payload");
    assert_eq!(completed.job_id(), Some("job0"));
    assert_eq!(completed.len, Some(64 * MIB));
    assert_eq!(completed.offset, Some(64 * MIB));
    assert_eq!(completed.error, None);
    qmp.wait_event(WAIT, |e| is_status(e, "job0", JobStatus::Concluded))
        .unwrap();
    assert_eq!(qmp.run(&QueryJobs).unwrap()[0].status, JobStatus::Concluded);

    qmp.run(&JobDismiss::new("job0")).unwrap();
    qmp.wait_event(WAIT, |e| is_status(e, "job0", JobStatus::Null))
        .unwrap();
    assert!(qmp.run(&QueryJobs).unwrap().is_empty());
    assert!(qmp.drain_events().is_empty());
    assert_eq!(qmp.dropped_events(), 0);
}

#[test]
fn cancelling_a_grouped_job_cancels_the_group() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();
    for name in ["src0", "src1", "dst0", "dst1"] {
        add_null(&qmp, name, 64 * MIB);
    }
    let slow = |job: &str, src: &str, dst: &str| BlockdevBackup {
        speed: Some(64 * 1024),
        ..BlockdevBackup::new(job, src, dst, SyncMode::Full)
    };
    qmp.run(
        &Transaction::grouped()
            .with(&slow("j0", "src0", "dst0"))
            .with(&slow("j1", "src1", "dst1")),
    )
    .unwrap();
    qmp.wait_event(WAIT, |e| is_status(e, "j0", JobStatus::Running))
        .unwrap();
    let running = qmp.run(&QueryJobs).unwrap();
    assert_eq!(running.len(), 2, "{running:?}");

    qmp.run(&JobCancel::new("j0")).unwrap();
    let mut cancelled = BTreeSet::new();
    while cancelled.len() < 2 {
        let event = qmp
            .wait_event(WAIT, |e| e.name == Event::BLOCK_JOB_CANCELLED)
            .unwrap()
            .block_job()
            .expect("BLOCK_JOB_CANCELLED payload");
        assert!(event.offset < event.len, "{event:?}");
        assert_eq!(event.speed, Some(64 * 1024));
        cancelled.insert(event.job_id().unwrap().to_owned());
    }
    assert_eq!(
        cancelled,
        BTreeSet::from(["j0".to_owned(), "j1".to_owned()])
    );
    for job in ["j0", "j1"] {
        qmp.wait_event(WAIT, |e| is_status(e, job, JobStatus::Null))
            .unwrap();
    }
    assert!(qmp.run(&QueryJobs).unwrap().is_empty());
}

#[test]
fn stopped_daemon_times_out_then_recovers() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();

    daemon.signal("-STOP");
    let result = qmp.run_timeout(&QueryJobs, Duration::from_millis(300));
    daemon.signal("-CONT");
    assert!(
        matches!(&result, Err(Error::Timeout { command, .. }) if command == "query-jobs"),
        "{result:?}"
    );
    // The late reply to the timed-out command is dropped; the next command
    // gets its own.
    let version = qmp.run(&QueryVersion).unwrap();
    assert!(version.qemu >= QemuVersion::new(5, 0, 0), "{version:?}");
    assert!(qmp.run(&QueryJobs).unwrap().is_empty());
}

#[test]
fn killing_the_daemon_disconnects_every_caller() {
    let mut daemon = Daemon::start();
    let qmp = daemon.connect();

    // A stopped daemon leaves the command unanswered until it is killed.
    daemon.signal("-STOP");
    let started = Instant::now();
    std::thread::scope(|s| {
        let command = s.spawn(|| qmp.run(&QueryJobs));
        let waiter = s.spawn(|| qmp.wait_event(Duration::from_secs(60), |_| false));
        std::thread::sleep(Duration::from_millis(300));
        daemon.kill();
        let command = command.join().unwrap();
        assert!(
            matches!(command, Err(Error::Disconnected { .. })),
            "{command:?}"
        );
        let waited = waiter.join().unwrap();
        assert!(
            matches!(waited, Err(Error::Disconnected { .. })),
            "{waited:?}"
        );
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(!qmp.is_connected());
    assert!(matches!(
        qmp.run(&QueryJobs),
        Err(Error::Disconnected { .. })
    ));
    assert!(matches!(
        qmp.next_event(Duration::from_secs(1)),
        Err(Error::Disconnected { .. })
    ));
}

//! Live restore: copy each drive of a running VM, booted from an archive
//! (`vma serve` behind a qcow2 overlay), into its final storage while the
//! guest runs, then put the copy in the drive's place and drop the
//! overlay and the NBD node, so that the VM no longer depends on `vma`.
//!
//! Per drive, over QMP (tested with QEMU 10.0):
//!
//! 1. `blockdev-add` of the target (raw over a file or a block device, or
//!    qcow2 with `"backing": null`), `discard: unmap` so the zero ranges
//!    the mirror writes stay holes;
//! 2. `blockdev-mirror` from the drive's node, `sync: full`, both error
//!    policies `stop` (never `ignore`: on a damaged range it retries for
//!    ever), `auto-dismiss: false`, a named filter node;
//! 3. progress from `query-jobs`; a job paused by an error is resumed
//!    with back-off (it continues where it stopped) while it makes
//!    progress; after [`Options::retries`] resumes without progress it is
//!    cancelled and the drive stays on the overlay;
//! 4. on `ready`, `job-complete`: QEMU puts the target in place;
//! 5. `job-dismiss`, a check with `query-block` that the device reads the
//!    target, then `blockdev-del` of the old node and of its backing chain
//!    (the overlay, then the NBD node).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::qmp::{
    self, BlockDeviceInfo, BlockdevAdd, BlockdevDel, BlockdevMirror, BlockdevOptions, BlockdevRef,
    Discard, Driver, Event, JobComplete, JobDismiss, JobInfo, JobResume, JobStatus, OnError, Qmp,
    QueryBlock, QueryJobs, QueryNamedBlockNodes, SyncMode,
};

/// What can go wrong in a live restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// Talking to QEMU failed.
    #[error("QMP: {0}")]
    Qmp(#[from] qmp::Error),
    /// A drive or target that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// The copy of a drive failed; the VM still runs from its old node.
    #[error("drive {drive}: {message}")]
    Copy {
        /// The drive (node or device as given).
        drive: String,
        /// What happened and what to do.
        message: String,
    },
    /// Interrupted: the jobs were cancelled, the VM still runs from its
    /// old nodes.
    #[error("cancelled; the VM still runs from the archive (run live-restore again)")]
    Cancelled,
}

/// Format of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFormat {
    /// Raw bytes (a file or a block device).
    Raw,
    /// A qcow2 image (created beforehand, of the drive's size).
    Qcow2,
}

/// One drive to restore.
#[derive(Debug, Clone)]
pub struct DriveTarget {
    /// The node the guest device reads (`overlay-vd0`), or the device's
    /// name or qdev id / QOM path.
    pub drive: String,
    /// Where it goes: a file (created when missing, raw only) or a block
    /// device.
    pub path: PathBuf,
    /// Its format.
    pub format: TargetFormat,
}

/// Options of [`live_restore`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Rate limit per job in bytes per second (0: none).
    pub speed: u64,
    /// Resumes of a paused job without progress before giving up.
    pub retries: u32,
    /// How often progress is polled.
    pub poll: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            speed: 0,
            retries: 5,
            poll: Duration::from_millis(500),
        }
    }
}

/// What happens, for progress output.
#[derive(Debug, Clone)]
pub enum Report {
    /// A job started: drive, source node, target node, size.
    Started {
        /// The drive as given.
        drive: String,
        /// The node copied from (and replaced).
        source: String,
        /// Bytes to copy.
        size: u64,
    },
    /// Progress of a drive: done and total (QEMU's units: bytes, the total
    /// grows with guest writes).
    Progress {
        /// The drive.
        drive: String,
        /// Done.
        current: u64,
        /// Total.
        total: u64,
    },
    /// The job paused on an error and is resumed (or not).
    Error {
        /// The drive.
        drive: String,
        /// `read` (the archive side) or `write` (the target).
        operation: String,
        /// What is done about it.
        message: String,
    },
    /// The drive now reads the target.
    Pivoted {
        /// The drive.
        drive: String,
    },
    /// A node no longer needed was removed.
    Removed {
        /// The drive.
        drive: String,
        /// The node.
        node: String,
    },
}

/// The result of one drive.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The drive as given.
    pub drive: String,
    /// The node copied from.
    pub source: String,
    /// The node now in its place.
    pub target_node: String,
    /// Nodes removed afterwards (overlay, NBD node, ...).
    pub removed: Vec<String>,
}

/// Per-drive state during the copy.
struct Job {
    drive: String,
    id: String,
    source: String,
    target_node: String,
    /// Nodes below the source, top down (its backing chain).
    chain: Vec<String>,
    /// The target file was created here (removed again on failure).
    created: Option<PathBuf>,
    completing: bool,
    done: bool,
    /// Progress when the job last paused on an error.
    paused_at: Option<u64>,
    /// Resumes without progress so far.
    fruitless: u32,
    next_resume: Option<Instant>,
    last_error: Option<String>,
}

/// The node (and its size) a drive given as a node name, a device name or
/// a qdev id names, with the named nodes of its backing chain below it.
fn resolve(
    drive: &str,
    blocks: &[qmp::BlockInfo],
    nodes: &[BlockDeviceInfo],
) -> Result<(String, u64, Vec<String>), RestoreError> {
    let node_name = if nodes.iter().any(|n| n.node_name == drive) {
        drive.to_string()
    } else {
        let device = blocks.iter().find(|b| {
            b.device == drive
                || b.qdev.as_deref() == Some(drive)
                || b.qdev
                    .as_deref()
                    .is_some_and(|q| q.ends_with(&format!("/{drive}/virtio-backend")))
        });
        match device.and_then(|b| b.inserted.as_ref()) {
            Some(i) if !i.node_name.is_empty() => i.node_name.clone(),
            _ => {
                return Err(RestoreError::Invalid(format!(
                    "no block node, device or qdev id {drive:?} in this VM \
                     (query-block lists the devices, query-named-block-nodes the nodes)"
                )))
            }
        }
    };
    let node = nodes
        .iter()
        .find(|n| n.node_name == node_name)
        .ok_or_else(|| RestoreError::Invalid(format!("node {node_name} not found")))?;
    // The backing chain, found by the file names QEMU reports: a node's
    // backing_file is its backing node's file.
    let mut chain = Vec::new();
    let mut backing = node.backing_file.clone();
    while let Some(file) = backing.take() {
        let Some(below) = nodes
            .iter()
            .find(|n| n.file == file && !chain.contains(&n.node_name) && n.node_name != node_name)
        else {
            break;
        };
        chain.push(below.node_name.clone());
        backing = below.backing_file.clone();
    }
    Ok((node_name, node.image.virtual_size, chain))
}

/// The node options of a target of `size` bytes.
/// The options, and the path of the target file if it was created here.
fn target_options(
    node: &str,
    target: &DriveTarget,
    size: u64,
) -> Result<(BlockdevOptions, Option<PathBuf>), RestoreError> {
    let invalid = |m: String| RestoreError::Invalid(m);
    let path = &target.path;
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(invalid(format!("target {}: {e}", path.display()))),
    };
    use std::os::unix::fs::FileTypeExt;
    let is_device = meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    let proto = if is_device {
        Driver::HostDevice {
            filename: path.clone(),
        }
    } else {
        Driver::File {
            filename: path.clone(),
        }
    };
    let file = BlockdevRef::Options(Box::new(BlockdevOptions::unnamed(proto)));
    let mut created = None;
    let driver = match target.format {
        TargetFormat::Raw => {
            let have = match &meta {
                None => {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .map_err(|e| invalid(format!("creating {}: {e}", path.display())))?;
                    created = Some(path.clone());
                    if let Err(e) = f.set_len(size) {
                        let _ = std::fs::remove_file(path);
                        return Err(invalid(format!("sizing {}: {e}", path.display())));
                    }
                    size
                }
                Some(_) if is_device => device_size(path)?,
                Some(m) => m.len(),
            };
            if have < size || (have > size && !is_device) {
                return Err(invalid(format!(
                    "target {} holds {have} bytes, the drive {size}: give a file of \
                     exactly the drive's size (or a missing path, created), or a block \
                     device at least that large",
                    path.display()
                )));
            }
            Driver::Raw {
                file,
                size: (have > size).then_some(size),
            }
        }
        TargetFormat::Qcow2 => {
            if meta.is_none() {
                return Err(invalid(format!(
                    "qcow2 target {} does not exist: create it first with \
                     `qemu-img create -f qcow2 {} {size}`",
                    path.display(),
                    path.display()
                )));
            }
            Driver::Qcow2Alone {
                file,
                backing: None,
            }
        }
    };
    Ok((
        BlockdevOptions {
            discard: Some(Discard::Unmap),
            ..BlockdevOptions::new(node, driver)
        },
        created,
    ))
}

/// Size of a block device.
fn device_size(path: &Path) -> Result<u64, RestoreError> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)
        .map_err(|e| RestoreError::Invalid(format!("opening {}: {e}", path.display())))?;
    f.seek(SeekFrom::End(0))
        .map_err(|e| RestoreError::Invalid(format!("sizing {}: {e}", path.display())))
}

/// Restore every drive of `targets` over the QMP connection `qmp` while
/// the VM runs; `cancel` (Ctrl-C) cancels the jobs. On success every
/// drive reads its target and the old nodes are gone.
pub fn live_restore(
    qmp: &Qmp,
    targets: &[DriveTarget],
    options: &Options,
    cancel: &AtomicBool,
    report: &mut dyn FnMut(Report),
) -> Result<Vec<Restored>, RestoreError> {
    let blocks = qmp.run(&QueryBlock)?;
    let nodes = qmp.run(&QueryNamedBlockNodes { flat: true })?;
    let mut jobs: Vec<Job> = Vec::new();
    let mut started: Vec<String> = Vec::new();
    let result = (|| {
        for (i, t) in targets.iter().enumerate() {
            let (source, size, chain) = resolve(&t.drive, &blocks, &nodes)?;
            if jobs.iter().any(|j| j.source == source) {
                return Err(RestoreError::Invalid(format!(
                    "drive {} is given twice",
                    t.drive
                )));
            }
            let suffix = format!("{}-{i}", std::process::id());
            let target_node = format!("vma-target-{suffix}");
            let (node_options, created) = target_options(&target_node, t, size)?;
            let forget = |e: qmp::Error| {
                if let Some(path) = &created {
                    let _ = std::fs::remove_file(path);
                }
                RestoreError::from(e)
            };
            qmp.run(&BlockdevAdd(node_options)).map_err(forget)?;
            let id = format!("vma-restore-{suffix}");
            let mirror = BlockdevMirror {
                speed: (options.speed > 0).then_some(options.speed),
                on_source_error: Some(OnError::Stop),
                on_target_error: Some(OnError::Stop),
                filter_node_name: Some(format!("vma-mirror-{suffix}")),
                auto_dismiss: Some(false),
                ..BlockdevMirror::new(&id, &source, &target_node, SyncMode::Full)
            };
            if let Err(e) = qmp.run(&mirror) {
                let _ = qmp.run(&BlockdevDel {
                    node_name: target_node.clone(),
                });
                return Err(forget(e));
            }
            started.push(id.clone());
            report(Report::Started {
                drive: t.drive.clone(),
                source: source.clone(),
                size,
            });
            jobs.push(Job {
                drive: t.drive.clone(),
                id,
                source,
                target_node,
                chain,
                created,
                completing: false,
                done: false,
                paused_at: None,
                fruitless: 0,
                next_resume: None,
                last_error: None,
            });
        }
        run_jobs(qmp, &mut jobs, options, cancel, report)
    })();
    if result.is_err() {
        // Leave the VM as it was: on its old nodes, nothing of ours left.
        let ids: Vec<String> = jobs
            .iter()
            .filter(|j| !j.done)
            .map(|j| j.id.clone())
            .collect();
        let _ = qmp.cancel_jobs(&ids, Duration::from_secs(30));
        for j in jobs.iter().filter(|j| !j.done) {
            let _ = qmp.run(&JobDismiss::new(&j.id));
            let _ = qmp.run(&BlockdevDel {
                node_name: j.target_node.clone(),
            });
            // A partial copy in a file made here is of no use.
            if let Some(path) = &j.created {
                let _ = std::fs::remove_file(path);
            }
        }
        return result.map(|()| Vec::new());
    }
    let mut out = Vec::new();
    for j in &jobs {
        let mut removed = Vec::new();
        for node in std::iter::once(&j.source).chain(j.chain.iter()) {
            // Nodes QEMU made itself (-drive, or a backing file opened from
            // the image header) cannot be deleted: they go with their last
            // user, which the check below confirms.
            if qmp
                .run(&BlockdevDel {
                    node_name: node.clone(),
                })
                .is_ok()
            {
                removed.push(node.clone());
                report(Report::Removed {
                    drive: j.drive.clone(),
                    node: node.clone(),
                });
            }
        }
        out.push(Restored {
            drive: j.drive.clone(),
            source: j.source.clone(),
            target_node: j.target_node.clone(),
            removed,
        });
    }
    // The VM must not read from any of the old nodes any more.
    let left = qmp.run(&QueryNamedBlockNodes { flat: true })?;
    for j in &jobs {
        for node in std::iter::once(&j.source).chain(j.chain.iter()) {
            if let Some(n) = left.iter().find(|n| &n.node_name == node) {
                return Err(RestoreError::Copy {
                    drive: j.drive.clone(),
                    message: format!(
                        "the copy is in place, but node {node} ({}, {}) is still open: \
                         remove it with blockdev-del once nothing uses it",
                        n.drv, n.file
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// Drive the jobs to completion.
fn run_jobs(
    qmp: &Qmp,
    jobs: &mut [Job],
    options: &Options,
    cancel: &AtomicBool,
    report: &mut dyn FnMut(Report),
) -> Result<(), RestoreError> {
    let mut last_report = Instant::now() - Duration::from_secs(10);
    while jobs.iter().any(|j| !j.done) {
        if cancel.load(Ordering::Relaxed) {
            return Err(RestoreError::Cancelled);
        }
        // Errors first (one event per request in flight: keep the last).
        for e in qmp.drain_events() {
            note_event(jobs, &e);
        }
        let infos: HashMap<String, JobInfo> = qmp
            .run(&QueryJobs)?
            .into_iter()
            .map(|j| (j.id.clone(), j))
            .collect();
        let show = last_report.elapsed() >= Duration::from_secs(1);
        for j in jobs.iter_mut().filter(|j| !j.done) {
            let Some(info) = infos.get(&j.id) else {
                return Err(RestoreError::Copy {
                    drive: j.drive.clone(),
                    message: "the restore job disappeared (cancelled by someone else?)".into(),
                });
            };
            if show {
                report(Report::Progress {
                    drive: j.drive.clone(),
                    current: info.current_progress,
                    total: info.total_progress,
                });
            }
            step(qmp, j, info, options, report)?;
        }
        if show {
            last_report = Instant::now();
        }
        if jobs.iter().any(|j| !j.done) {
            // Wake on the next event (a status change) or after `poll`.
            if let Some(e) = qmp.next_event(options.poll)? {
                note_event(jobs, &e);
            }
        }
    }
    Ok(())
}

/// Remember the error a `BLOCK_JOB_ERROR` names.
fn note_event(jobs: &mut [Job], e: &Event) {
    if e.name != Event::BLOCK_JOB_ERROR {
        return;
    }
    let Some(b) = e.block_job() else { return };
    if let Some(j) = jobs.iter_mut().find(|j| Some(j.id.as_str()) == b.job_id()) {
        j.last_error = b.operation.clone();
    }
}

/// One look at a job: resume, complete, or finish it.
fn step(
    qmp: &Qmp,
    j: &mut Job,
    info: &JobInfo,
    options: &Options,
    report: &mut dyn FnMut(Report),
) -> Result<(), RestoreError> {
    match info.status {
        JobStatus::Paused | JobStatus::Standby => {
            let operation = j.last_error.clone().unwrap_or_else(|| "I/O".into());
            let side = if operation == "write" {
                "writing the target (full or failing?)"
            } else {
                "reading the archive (vma serve stopped, or damaged data?)"
            };
            let now = Instant::now();
            if j.paused_at != Some(info.current_progress) || j.next_resume.is_none() {
                // A new pause (or progress since the last one).
                if j.paused_at != Some(info.current_progress) {
                    j.fruitless = 0;
                }
                j.paused_at = Some(info.current_progress);
                let wait = Duration::from_secs(2u64 << j.fruitless.min(4));
                j.next_resume = Some(now + wait);
                report(Report::Error {
                    drive: j.drive.clone(),
                    operation: operation.clone(),
                    message: format!(
                        "paused at {} of {} bytes on an error {side}; resuming in {} s \
                         (attempt {} of {})",
                        info.current_progress,
                        info.total_progress,
                        wait.as_secs(),
                        j.fruitless + 1,
                        options.retries
                    ),
                });
            } else if j.next_resume.is_some_and(|t| now >= t) {
                if j.fruitless >= options.retries {
                    let advice = if operation == "write" {
                        "free space on (or fix) the target, then run live-restore again"
                    } else {
                        "the archive cannot be read there: check that vma serve runs; for \
                         damaged data restart it with --salvage (zeros, reported) and run \
                         live-restore again"
                    };
                    return Err(RestoreError::Copy {
                        drive: j.drive.clone(),
                        message: format!(
                            "the copy stays paused at {} bytes after {} resumes; the job is \
                             cancelled and the VM keeps running from the archive. {advice}",
                            info.current_progress, options.retries
                        ),
                    });
                }
                j.fruitless += 1;
                j.next_resume = None;
                qmp.run(&JobResume::new(&j.id))?;
            }
        }
        JobStatus::Ready if !j.completing => {
            qmp.run(&JobComplete::new(&j.id))?;
            j.completing = true;
        }
        JobStatus::Concluded => {
            if let Some(error) = &info.error {
                return Err(RestoreError::Copy {
                    drive: j.drive.clone(),
                    message: format!(
                        "the copy failed: {error}; the VM keeps running from the archive"
                    ),
                });
            }
            qmp.run(&JobDismiss::new(&j.id))?;
            j.done = true;
            check_pivot(qmp, j)?;
            report(Report::Pivoted {
                drive: j.drive.clone(),
            });
        }
        _ => {}
    }
    Ok(())
}

/// Check that the device that read the source now reads the target.
fn check_pivot(qmp: &Qmp, j: &Job) -> Result<(), RestoreError> {
    let blocks = qmp.run(&QueryBlock)?;
    let on_target = blocks.iter().any(|b| {
        b.inserted
            .as_ref()
            .is_some_and(|i| i.node_name == j.target_node)
    });
    let on_source = blocks
        .iter()
        .any(|b| b.inserted.as_ref().is_some_and(|i| i.node_name == j.source));
    if on_source || !on_target {
        return Err(RestoreError::Copy {
            drive: j.drive.clone(),
            message: format!(
                "the job ended but no device reads the target node {} \
                 (was {} attached to a guest device?)",
                j.target_node, j.source
            ),
        });
    }
    Ok(())
}

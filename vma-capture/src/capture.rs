//! Back up drives of a running QEMU into an archive.
//!
//! One `transaction` starts, for every drive, a `blockdev-backup` job whose
//! target is an NBD client node connected to our own NBD server, together
//! with the drive's new checkpoint bitmap. QEMU's copy-before-write sends
//! the old contents of every cluster the guest is about to overwrite first,
//! then the rest; the server hands every write to a [`ClusterAssembler`]
//! and whole clusters go through a bounded queue to the archive Writer on
//! a thread of its own. The jobs run with `auto-finalize=false`, so QEMU
//! touches no bitmap until the archive is complete, synced and renamed
//! into place; only then are the jobs finalized.
//!
//! With fleecing ([`crate::fleece`]) the transaction starts fleecing jobs
//! instead, and the backup jobs read the point-in-time views they make,
//! so a guest write only waits for a local copy into a scratch image; an
//! incremental job then reads a copy of the base bitmap frozen in the same
//! transaction, and QEMU never changes the base itself.
//!
//! Checkpoints live in the archives: the `vma-capture.json` config blob
//! names each drive's node, its checkpoint bitmap and whether the drive was
//! backed up in full or incrementally (and why it was not incremental).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use vma_core::extract::AtomicFile;
use vma_core::format::ParentRef;
use vma_core::types::clusters_for;
use vma_core::writer::WriteSummary;
use vma_core::{ArchiveMeta, ConfigBlob, DriveId, DriveInfo, Reader, Writer, WriterOptions};

use crate::assemble::{ClusterAssembler, Piece};
use crate::fleece::Fleece;
use crate::nbd::{Export, NbdServer, NbdSink};
use crate::qga::{AgentError, GuestAgent};
use crate::qmp::{self, action, DirtyBitmapAdd, JobStatus, QemuVersion, Qmp};

/// Name of the config blob that records how an archive was captured.
pub const CAPTURE_BLOB: &str = vma_core::configs::CAPTURE_RECORD;

/// Pieces waiting for the archive writer, at most (64 KiB each: 64 MiB).
const QUEUE_PIECES: usize = 1024;

/// What can go wrong during a capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Talking to QEMU failed.
    #[error("QMP: {0}")]
    Qmp(#[from] qmp::Error),
    /// The archive could not be written.
    #[error("archive: {0}")]
    Archive(#[from] vma_core::Error),
    /// Local I/O (the NBD socket, for example).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A drive or option that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// A backup job failed.
    #[error("backup job of drive {drive} failed: {error}")]
    Job {
        /// Drive name.
        drive: String,
        /// QEMU's message.
        error: String,
    },
    /// The guest agent could not freeze or thaw the guest.
    #[error("{0}")]
    Agent(#[from] AgentError),
    /// Interrupted (Ctrl-C).
    #[error("cancelled")]
    Cancelled,
    /// The capture failed, and what was copied was kept for a retry.
    #[error("{cause}; what was copied is kept in {}: capture again with --incremental-from {} to copy only the rest", partial.display(), partial.display())]
    KeptForRetry {
        /// Why the capture failed.
        cause: Box<CaptureError>,
        /// The partial archive.
        partial: PathBuf,
    },
}

/// Result of capture operations.
pub type Result<T> = std::result::Result<T, CaptureError>;

/// What QEMU does with the bitmap an incremental backup reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapMode {
    /// Consumed only if the backup succeeds; after a failure or cancel it
    /// still holds everything since the parent, so the next incremental
    /// from the same parent copies all of it again.
    OnSuccess,
    /// Never changed by the backup: the parent's checkpoint stays usable
    /// for more backups against the same parent (differential backups).
    Never,
    /// Synchronised even when the backup fails: what was copied is kept in
    /// `ARCHIVE.partial` (marked interrupted), and the drive's checkpoint
    /// then holds exactly what was not copied plus what the guest wrote
    /// since, so a retry from the partial archive copies only the rest.
    Always,
}

impl BitmapMode {
    fn qemu_name(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

/// A drive to capture: a block node (or a device's id) and the drive's name
/// in the archive.
#[derive(Clone, Debug)]
pub struct DriveSpec {
    /// Node name, or the device/qdev id `query-block` lists.
    pub node: String,
    /// Name in the archive (default: the device id, else the node name).
    pub name: Option<String>,
}

/// Everything a capture needs.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// QMP unix socket of the running QEMU.
    pub qmp: PathBuf,
    /// Archive to write (atomically).
    pub archive: PathBuf,
    /// Replace an existing archive.
    pub force: bool,
    /// Drives (empty: every device with a medium that `query-block` lists).
    pub drives: Vec<DriveSpec>,
    /// Config blobs stored with the drives (empty with a parent: the VM
    /// configs of the parent's point in time).
    pub configs: Vec<ConfigBlob>,
    /// The archive whose checkpoints an incremental backup starts from.
    pub parent: Option<PathBuf>,
    /// Bitmap policy of incremental backups.
    pub bitmap_mode: BitmapMode,
    /// Job speed limit in bytes per second (0: none).
    pub speed: u64,
    /// Archive compression and threads.
    pub writer: WriterOptions,
    /// Directory for the NBD socket (default: the system temp dir).
    pub socket_dir: Option<PathBuf>,
    /// Guest agent socket: freeze the guest's file systems for the moment
    /// the jobs start (the transaction), then thaw them.
    pub fsfreeze: Option<PathBuf>,
    /// Fleece through scratch images in this directory: guest writes copy
    /// old data into them, not into the archive (see [`crate::fleece`]).
    pub fleecing: Option<PathBuf>,
    /// Instead of a backup job, compare a point-in-time view of each drive
    /// with this archive (the newest of a chain) and store what differs
    /// (see [`crate::live_diff`]).
    pub diff_against: Option<PathBuf>,
    /// Where the ancestors of `diff_against` (or of `parent`) are, besides
    /// beside it.
    pub chain_parents: Vec<PathBuf>,
    /// QEMU's NBD server socket, if QEMU already runs one (`diff_against`
    /// exports its views there instead of starting the server).
    pub qemu_nbd_socket: Option<PathBuf>,
}

/// How one drive was captured; stored in [`CAPTURE_BLOB`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveCheckpoint {
    /// Drive name in the archive.
    pub name: String,
    /// QEMU block node the drive was read from.
    pub node: String,
    /// Size in bytes.
    pub size: u64,
    /// Dirty bitmap started with this archive (the next incremental's base).
    pub bitmap: String,
    /// `full` or `incremental`.
    pub backup: String,
    /// Why an incremental capture backed this drive up in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Content of [`CAPTURE_BLOB`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRecord {
    /// One entry per drive, in archive order.
    pub drives: Vec<DriveCheckpoint>,
}

/// Job progress over all drives.
#[derive(Clone, Copy, Debug, Default)]
pub struct JobProgress {
    /// Bytes the jobs have processed.
    pub done: u64,
    /// Bytes the jobs will process in total (grows while they run).
    pub total: u64,
}

/// Outcome of a capture.
#[derive(Debug)]
pub struct CaptureSummary {
    /// Per drive: how it was captured.
    pub drives: Vec<DriveCheckpoint>,
    /// The archive writer's summary.
    pub write: WriteSummary,
    /// Per drive: clusters that arrived as data or zeros (the rest is
    /// unchanged from the parent) and how many of them arrived behind a
    /// cluster with a higher number (copy-before-write at work).
    pub clusters_stored: Vec<DriveStats>,
    /// With fleecing: the most the scratch images took on disk at once
    /// (sampled a few times a second).
    pub scratch_peak: Option<u64>,
    /// What could not be cleaned up after the archive was complete.
    pub warnings: Vec<String>,
    /// What an earlier capture that could not clean up (killed) had left
    /// in QEMU, removed before this one started.
    pub cleared: Vec<String>,
}

/// What arrived for one drive.
#[derive(Clone, Copy, Debug, Default)]
pub struct DriveStats {
    /// Clusters stored (data or zero).
    pub clusters: u64,
    /// Of those, clusters that arrived out of order.
    pub out_of_order: u64,
    /// Clusters stored as unchanged from the parent.
    pub unchanged: u64,
}

/// One drive as found in QEMU.
pub(crate) struct Drive {
    pub(crate) id: DriveId,
    pub(crate) name: String,
    pub(crate) node: String,
    pub(crate) size: u64,
    /// Parent checkpoint bitmap to read from, when incremental.
    pub(crate) base_bitmap: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) bitmap: String,
    pub(crate) persistent: bool,
}

impl Drive {
    /// The drive as the archive header lists it.
    pub(crate) fn info(&self) -> DriveInfo {
        DriveInfo {
            id: self.id,
            name: self.name.clone(),
            size: self.size,
        }
    }
}

/// Capture the drives of the QEMU at `options.qmp` into `options.archive`.
/// `cancel` is polled: once set, the jobs are cancelled and nothing is
/// kept. `progress` is called a few times a second.
pub fn capture(
    options: &CaptureOptions,
    cancel: &AtomicBool,
    mut progress: impl FnMut(JobProgress),
) -> Result<CaptureSummary> {
    if options.archive.exists() && !options.force {
        return Err(CaptureError::Invalid(format!(
            "{} exists (use --force to replace it)",
            options.archive.display()
        )));
    }
    if options.diff_against.is_some() {
        return crate::live_diff::capture_by_diff(options, cancel, progress);
    }
    let qmp = Qmp::connect(&options.qmp)?;
    let cleared = crate::leftovers::clear(&qmp)?;
    let parent = options.parent.as_deref().map(read_parent).transpose()?;
    // The VM configs of the parent's point in time go forward unless new
    // ones are given.
    let configs = match options.parent.as_deref() {
        Some(path) if options.configs.is_empty() => {
            vma_core::configs::carried_from(path, &options.chain_parents)?
        }
        _ => options.configs.clone(),
    };
    let mut meta = ArchiveMeta::new(Vec::new(), configs);
    let uuid_hex = hex_uuid(&meta.uuid);
    let mut drives = find_drives(&qmp, &options.drives)?;
    for d in &mut drives {
        d.bitmap = format!("vma-{uuid_hex}");
        if let Some((_, record)) = &parent {
            decide_incremental(&qmp, d, record)?;
        }
    }
    let any_incremental = drives.iter().any(|d| d.base_bitmap.is_some());
    meta.parent = parent.as_ref().filter(|_| any_incremental).map(|(p, _)| *p);
    meta.drives = drives.iter().map(Drive::info).collect();
    let record = CaptureRecord {
        drives: drives.iter().map(checkpoint_of).collect(),
    };
    add_record(&mut meta, &record)?;

    let out = AtomicFile::create(&options.archive)?;
    let writer = Writer::new(out, meta, &options.writer)?;
    let (tx, rx) = crossbeam_channel::bounded::<Piece>(QUEUE_PIECES);
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let writer_thread = {
        let failure = failure.clone();
        std::thread::Builder::new()
            .name("vma-capture-writer".into())
            .spawn(move || write_pieces(writer, rx, &failure))
            .map_err(|e| io_err("starting the archive writer", e))?
    };
    let sinks: Vec<Arc<DriveSink>> = drives
        .iter()
        .map(|d| {
            Arc::new(DriveSink {
                assembler: Mutex::new(ClusterAssembler::new(d.id, d.size)),
                queue: Mutex::new(Some(tx.clone())),
                failure: failure.clone(),
            })
        })
        .collect();
    drop(tx);
    let socket_dir = options
        .socket_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let socket = socket_dir.join(format!(
        "vma-capture-{}-{}.sock",
        std::process::id(),
        &uuid_hex[..8]
    ));
    let server = NbdServer::bind_unix(
        &socket,
        drives
            .iter()
            .zip(&sinks)
            .map(|(d, s)| Export {
                name: d.name.clone(),
                size: d.size,
                sink: s.clone() as Arc<dyn NbdSink>,
            })
            .collect(),
    )
    .map_err(|e| {
        io_err(
            &format!("starting the NBD server on {}", socket.display()),
            e,
        )
    })?;

    let mut session = Session {
        qmp: &qmp,
        drives: &drives,
        targets: Vec::new(),
        jobs: Vec::new(),
        new_bitmaps: Vec::new(),
        fleece: None,
        sync_bitmaps: drives
            .iter()
            .map(|d| d.base_bitmap.clone().map(|b| (d.node.clone(), b)))
            .collect(),
        scratch_peak: 0,
        warnings: Vec::new(),
    };
    let ran = session.run(
        &socket,
        options,
        &uuid_hex[..8],
        cancel,
        &failure,
        &mut progress,
    );
    // With `always`, a failed incremental keeps what was copied: the jobs
    // are cancelled (QEMU then clears the copied clusters from the base
    // bitmaps), and each base bitmap is folded into the new checkpoint,
    // which the partial archive names as its drives' checkpoint.
    let keep_partial = ran.is_err()
        && options.bitmap_mode == BitmapMode::Always
        && drives.iter().all(|d| d.base_bitmap.is_some())
        && failure.lock().expect("failure lock").is_none()
        && session.abort_for_retry().is_ok();
    if ran.is_err() && !keep_partial {
        // Jobs that never started (a refused transaction) cleared nothing.
        let jobs_ran = !session.jobs.is_empty();
        // Stop QEMU first (cancel the jobs, drop the NBD nodes), so nothing
        // is writing when the server goes.
        session.abort();
        if options.bitmap_mode == BitmapMode::Always && options.fleecing.is_none() && jobs_ran {
            // QEMU cleared what was copied from the base bitmaps, but no
            // archive keeps it: the bitmaps no longer describe the change
            // since the parent. Drop them, so the next capture of these
            // drives is full instead of silently incomplete. (Fleecing
            // jobs read frozen copies, so the bases are still whole.)
            session.drop_base_bitmaps();
        }
    }
    // After success every job is pending: all its writes were acknowledged.
    server.shutdown();
    for s in &sinks {
        s.close();
    }
    // Joining drops the writer, and with it the temporary file, on failure.
    let written = writer_thread
        .join()
        .map_err(|_| CaptureError::Invalid("the archive writer panicked".into()))
        .and_then(|w| w);
    if keep_partial {
        let cause = ran.expect_err("failed");
        let partial = partial_name(&options.archive);
        return match written
            .and_then(|w| finish_archive(w, &drives, &sinks, true))
            .and_then(|(mut file, _, _)| {
                file.set_dest(partial.clone());
                Ok(file.commit()?)
            }) {
            Ok(()) => Err(CaptureError::KeptForRetry {
                cause: Box::new(cause),
                partial,
            }),
            Err(e) => {
                // No archive names the checkpoints the retry would start
                // from: drop them (the next capture is full).
                for d in &drives {
                    let _ = qmp.block_dirty_bitmap_remove(&d.node, &d.bitmap);
                }
                Err(CaptureError::Invalid(format!(
                    "{cause}; keeping what was copied failed too: {e}"
                )))
            }
        };
    }
    let finished = ran
        .and(written)
        .and_then(|writer| finish_archive(writer, &drives, &sinks, false))
        .and_then(|(file, summary, stored)| {
            // The archive is complete: make it durable under its name, then
            // let QEMU finalize (bitmaps change only now).
            file.commit()?;
            Ok((summary, stored))
        });
    match finished {
        Ok((summary, stored)) => {
            session.finalize(options.bitmap_mode)?;
            Ok(CaptureSummary {
                drives: record.drives,
                write: summary,
                clusters_stored: stored,
                scratch_peak: options.fleecing.as_ref().map(|_| session.scratch_peak),
                warnings: std::mem::take(&mut session.warnings),
                cleared,
            })
        }
        Err(e) => {
            session.abort();
            Err(e)
        }
    }
}

/// Store `record` in `meta` as the [`CAPTURE_BLOB`] config.
pub(crate) fn add_record(meta: &mut ArchiveMeta, record: &CaptureRecord) -> Result<()> {
    if meta.configs.iter().any(|c| c.name == CAPTURE_BLOB) {
        return Err(CaptureError::Invalid(format!(
            "the config name {CAPTURE_BLOB} is reserved for the capture record"
        )));
    }
    meta.configs.push(ConfigBlob {
        name: CAPTURE_BLOB.into(),
        data: serde_json::to_vec_pretty(&record).expect("serializable"),
    });
    Ok(())
}

/// Where an interrupted `always` capture keeps what it copied.
pub fn partial_name(archive: &Path) -> PathBuf {
    let mut name = archive.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// The QEMU-side objects one capture created, for finalizing or undoing.
struct Session<'a> {
    qmp: &'a Qmp,
    drives: &'a [Drive],
    /// NBD client nodes added.
    targets: Vec<String>,
    /// Backup job ids started (the jobs that write the archive).
    jobs: Vec<String>,
    /// (node, bitmap) added by the transaction.
    new_bitmaps: Vec<(String, String)>,
    /// With fleecing: the scratch images, fleecing jobs and views.
    fleece: Option<Fleece<'a>>,
    /// Per drive: the (node, bitmap) its backup job reads, when
    /// incremental: the base bitmap itself, or with fleecing a copy of it
    /// frozen at the point in time, on the view node.
    sync_bitmaps: Vec<Option<(String, String)>>,
    /// Most bytes the scratch images took at once.
    scratch_peak: u64,
    /// What could not be cleaned up.
    warnings: Vec<String>,
}

/// Name of the copy of a base bitmap frozen at the point in time (with
/// fleecing), for the drive whose new checkpoint is `checkpoint`.
fn frozen_name(checkpoint: &str) -> String {
    format!("{checkpoint}-frozen")
}

/// A disabled (not recording) bitmap `name` on `node`, for a frozen copy.
fn frozen_bitmap(node: &str, name: &str) -> DirtyBitmapAdd {
    DirtyBitmapAdd {
        granularity: Some(65536),
        persistent: Some(false),
        disabled: Some(true),
        ..DirtyBitmapAdd::new(node, name)
    }
}

impl Session<'_> {
    /// Add the targets, start the jobs, wait until every job is pending.
    /// With fleecing, the transaction starts the fleecing jobs (the point
    /// in time) and the backup jobs then read the views.
    fn run(
        &mut self,
        socket: &Path,
        options: &CaptureOptions,
        tag: &str,
        cancel: &AtomicBool,
        failure: &Mutex<Option<String>>,
        progress: &mut impl FnMut(JobProgress),
    ) -> Result<()> {
        for (i, d) in self.drives.iter().enumerate() {
            let target = format!("vma-target-{i}");
            self.qmp.execute(
                "blockdev-add",
                json!({
                    "driver": "nbd",
                    "node-name": target,
                    "server": {"type": "unix", "path": socket},
                    "export": d.name,
                }),
            )?;
            self.targets.push(target);
        }
        if let Some(dir) = &options.fleecing {
            let drives: Vec<(String, u64)> = self
                .drives
                .iter()
                .map(|d| (d.node.clone(), d.size))
                .collect();
            self.fleece = Some(Fleece::prepare(self.qmp, dir, &drives, tag)?);
        }
        let mut actions = Vec::new();
        let mut added = Vec::new();
        for (i, d) in self.drives.iter().enumerate() {
            actions.push(action::block_dirty_bitmap_add(&checkpoint_bitmap(d)));
            added.push((d.node.clone(), d.bitmap.clone()));
            match &self.fleece {
                Some(fleece) => {
                    if let Some(base) = &d.base_bitmap {
                        // The base as it is at the point in time: the
                        // backup job reads it after the transaction.
                        let frozen = frozen_name(&d.bitmap);
                        actions.push(action::block_dirty_bitmap_add(&frozen_bitmap(
                            &d.node, &frozen,
                        )));
                        actions.push(action::block_dirty_bitmap_merge(
                            &d.node,
                            &frozen,
                            &[base.as_str()],
                        ));
                        added.push((d.node.clone(), frozen));
                    }
                    actions.push(fleece.start_action(i));
                }
                None => {
                    let backup =
                        self.backup_arguments(i, &d.node, d.base_bitmap.as_deref(), options);
                    actions.push(action::custom("blockdev-backup", backup));
                }
            }
        }
        // Freeze only around the transaction: from then on copy-before-write
        // keeps the point in time, however long the copy takes.
        let (started, thawed) = with_frozen_guest(options.fsfreeze.as_deref(), || {
            self.qmp
                .execute("transaction", json!({ "actions": actions }))
                .map_err(CaptureError::from)
        })?;
        started?;
        self.new_bitmaps = added;
        match &mut self.fleece {
            Some(fleece) => fleece.started(),
            None => self.jobs = (0..self.drives.len()).map(job_id).collect(),
        }
        thawed?;
        if self.fleece.is_some() {
            self.start_from_views(options)?;
        }
        self.wait_pending(cancel, failure, progress)
    }

    /// The arguments of drive `i`'s backup job, reading `source` (with
    /// `bitmap` on it when incremental).
    fn backup_arguments(
        &self,
        i: usize,
        source: &str,
        bitmap: Option<&str>,
        options: &CaptureOptions,
    ) -> serde_json::Value {
        let mut backup = json!({
            "job-id": job_id(i),
            "device": source,
            "target": self.targets[i],
            "sync": "full",
            "auto-finalize": false,
            "auto-dismiss": false,
        });
        if let Some(bitmap) = bitmap {
            backup["sync"] = json!("bitmap");
            backup["bitmap"] = json!(bitmap);
            backup["bitmap-mode"] = json!(options.bitmap_mode.qemu_name());
        }
        if options.speed > 0 {
            backup["speed"] = json!(options.speed);
        }
        // Cluster size 64 KiB even on sources with smaller clusters
        // (`x-perf.min-cluster-size` exists since QEMU 9.1).
        if self.qmp.version() >= QemuVersion::new(9, 1, 0) {
            backup["x-perf"] = json!({"min-cluster-size": 65536});
        }
        backup
    }

    /// With fleecing, after the transaction: add the views, move each
    /// frozen base bitmap onto its view (a backup job reads bitmaps of its
    /// source node), and start the backup jobs from the views with
    /// `discard-source`, so scratch space is released as they copy.
    fn start_from_views(&mut self, options: &CaptureOptions) -> Result<()> {
        let fleece = self.fleece.as_mut().expect("fleecing");
        fleece.open_views()?;
        let mut actions = Vec::new();
        for (i, d) in self.drives.iter().enumerate() {
            let view = self
                .fleece
                .as_ref()
                .expect("fleecing")
                .view_node(i)
                .to_owned();
            let bitmap = match &d.base_bitmap {
                Some(_) => {
                    let frozen = frozen_name(&d.bitmap);
                    self.qmp
                        .block_dirty_bitmap_add(&frozen_bitmap(&view, &frozen))?;
                    self.qmp.execute(
                        "block-dirty-bitmap-merge",
                        json!({
                            "node": view,
                            "target": frozen,
                            "bitmaps": [{"node": d.node, "name": frozen}],
                        }),
                    )?;
                    self.qmp.block_dirty_bitmap_remove(&d.node, &frozen)?;
                    self.new_bitmaps
                        .retain(|(n, b)| !(n == &d.node && b == &frozen));
                    self.sync_bitmaps[i] = Some((view.clone(), frozen.clone()));
                    Some(frozen)
                }
                None => None,
            };
            let mut backup = self.backup_arguments(i, &view, bitmap.as_deref(), options);
            backup["discard-source"] = json!(true);
            actions.push(action::custom("blockdev-backup", backup));
        }
        self.qmp
            .execute("transaction", json!({ "actions": actions }))?;
        self.jobs = (0..self.drives.len()).map(job_id).collect();
        Ok(())
    }

    fn wait_pending(
        &mut self,
        cancel: &AtomicBool,
        failure: &Mutex<Option<String>>,
        progress: &mut impl FnMut(JobProgress),
    ) -> Result<()> {
        let names: Vec<String> = self.drives.iter().map(|d| d.name.clone()).collect();
        let mut last_poll = Instant::now() - Duration::from_secs(1);
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(CaptureError::Cancelled);
            }
            if let Some(msg) = failure.lock().expect("failure lock").clone() {
                return Err(CaptureError::Invalid(msg));
            }
            // Events only wake us up; query-jobs is the truth.
            let _ = self.qmp.next_event(Duration::from_millis(200))?;
            if last_poll.elapsed() < Duration::from_millis(200) {
                continue;
            }
            last_poll = Instant::now();
            let jobs = self.qmp.query_jobs()?;
            if let Some(fleece) = &self.fleece {
                fleece.check_running(&jobs, &names)?;
                self.scratch_peak = self.scratch_peak.max(fleece.scratch_bytes());
            }
            let mut p = JobProgress::default();
            let mut pending = 0;
            for (i, id) in self.jobs.iter().enumerate() {
                let Some(j) = jobs.iter().find(|j| &j.id == id) else {
                    return Err(CaptureError::Job {
                        drive: self.drives[i].name.clone(),
                        error: "the job disappeared".into(),
                    });
                };
                p.done += j.current_progress;
                p.total += j.total_progress;
                match j.status {
                    JobStatus::Pending => pending += 1,
                    JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null => {
                        return Err(CaptureError::Job {
                            drive: self.drives[i].name.clone(),
                            error: j
                                .error
                                .clone()
                                .unwrap_or_else(|| format!("job {}", j.status)),
                        })
                    }
                    _ => {}
                }
            }
            progress(p);
            if pending == self.jobs.len() {
                return Ok(());
            }
        }
    }

    /// Finalize and dismiss the jobs, then drop what the capture added
    /// besides the new checkpoints. Unless the mode is `never`, the
    /// parent's bitmaps were consumed by the jobs and are removed.
    fn finalize(&mut self, mode: BitmapMode) -> Result<()> {
        for id in &self.jobs {
            self.qmp.execute("job-finalize", json!({ "id": id }))?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in std::mem::take(&mut self.jobs) {
            loop {
                let jobs = self.qmp.query_jobs()?;
                match jobs.iter().find(|j| j.id == id) {
                    Some(j) if j.status == JobStatus::Concluded => break,
                    Some(_) if Instant::now() < deadline => {
                        let _ = self.qmp.next_event(Duration::from_millis(50))?;
                    }
                    _ => break,
                }
            }
            let _ = self.qmp.execute("job-dismiss", json!({ "id": id }));
        }
        self.remove_fleece();
        self.remove_targets();
        if mode != BitmapMode::Never {
            // Consumed by the jobs: the new checkpoints carry on from here.
            self.drop_base_bitmaps();
        }
        self.new_bitmaps.clear();
        Ok(())
    }

    /// Undo: cancel and dismiss the jobs, remove the targets and the new
    /// checkpoint bitmaps (no archive holds them). Best effort: QEMU may
    /// be gone.
    fn abort(&mut self) {
        for id in &self.jobs {
            let _ = self.qmp.job_cancel(id);
        }
        let jobs = std::mem::take(&mut self.jobs);
        let _ = self.qmp.wait_jobs_concluded(&jobs, Duration::from_secs(30));
        for id in jobs {
            let _ = self.qmp.execute("job-dismiss", json!({ "id": id }));
        }
        self.remove_fleece();
        self.remove_targets();
        for (node, name) in std::mem::take(&mut self.new_bitmaps) {
            let _ = self.qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": name}),
            );
        }
    }

    /// Undo for a retry (`always`): cancel and dismiss the jobs, remove the
    /// targets, fold each bitmap the jobs read (QEMU cleared what they
    /// copied from it) into the new checkpoint and drop the base.
    fn abort_for_retry(&mut self) -> Result<()> {
        if self.jobs.len() != self.drives.len() {
            return Err(CaptureError::Invalid(
                "the backup jobs never started".into(),
            ));
        }
        for id in &self.jobs {
            self.qmp.job_cancel(id)?;
        }
        if !self
            .qmp
            .wait_jobs_concluded(&self.jobs, Duration::from_secs(30))?
        {
            return Err(CaptureError::Invalid(
                "the backup jobs did not stop within 30 s of being cancelled".into(),
            ));
        }
        for id in std::mem::take(&mut self.jobs) {
            self.qmp.job_dismiss(&id)?;
        }
        for (d, read) in self.drives.iter().zip(&self.sync_bitmaps) {
            let base = d.base_bitmap.as_deref().expect("incremental");
            let (node, bitmap) = read.as_ref().expect("incremental drives read a bitmap");
            self.qmp.execute(
                "block-dirty-bitmap-merge",
                json!({
                    "node": d.node,
                    "target": d.bitmap,
                    "bitmaps": [{"node": node, "name": bitmap}],
                }),
            )?;
            self.qmp.block_dirty_bitmap_remove(&d.node, base)?;
        }
        self.remove_fleece();
        self.remove_targets();
        self.new_bitmaps.clear();
        Ok(())
    }

    /// Remove the base bitmaps of incremental drives (best effort).
    fn drop_base_bitmaps(&self) {
        for d in self.drives {
            if let Some(base) = &d.base_bitmap {
                let _ = self.qmp.block_dirty_bitmap_remove(&d.node, base);
            }
        }
    }

    fn remove_fleece(&mut self) {
        if let Some(mut fleece) = self.fleece.take() {
            self.scratch_peak = self.scratch_peak.max(fleece.scratch_bytes());
            self.warnings.extend(fleece.teardown());
        }
    }

    fn remove_targets(&mut self) {
        for t in std::mem::take(&mut self.targets) {
            let _ = self.qmp.execute("blockdev-del", json!({ "node-name": t }));
        }
    }
}

fn job_id(i: usize) -> String {
    format!("vma-backup-{i}")
}

/// The new checkpoint bitmap of drive `d`.
pub(crate) fn checkpoint_bitmap(d: &Drive) -> DirtyBitmapAdd {
    DirtyBitmapAdd {
        granularity: Some(65536),
        persistent: Some(d.persistent),
        ..DirtyBitmapAdd::new(&d.node, &d.bitmap)
    }
}

/// Run `f` (the transaction that sets the point in time) with the guest's
/// file systems frozen through the agent at `agent`, if given; they are
/// thawed whatever `f` returns. `Err` if the freeze failed (`f` did not
/// run); else what `f` returned and whether the thaw worked.
pub(crate) fn with_frozen_guest<T>(
    agent: Option<&Path>,
    f: impl FnOnce() -> Result<T>,
) -> Result<(Result<T>, Result<()>)> {
    let mut agent = agent.map(GuestAgent::connect).transpose()?;
    if let Some(a) = agent.as_mut() {
        if let Err(e) = a.freeze() {
            // A freeze that failed half-way may have frozen some file systems.
            let _ = a.thaw();
            return Err(e.into());
        }
    }
    let result = f();
    let thawed = match agent.as_mut() {
        Some(a) => a.thaw().map(drop).map_err(CaptureError::from),
        None => Ok(()),
    };
    Ok((result, thawed))
}

/// The NBD sink of one drive: assembles clusters and queues them for the
/// archive writer.
struct DriveSink {
    assembler: Mutex<ClusterAssembler>,
    /// None once closed.
    queue: Mutex<Option<crossbeam_channel::Sender<Piece>>>,
    failure: Arc<Mutex<Option<String>>>,
}

impl DriveSink {
    fn close(&self) {
        self.queue.lock().expect("queue lock").take();
    }

    fn push(&self, pieces: Vec<Piece>) -> std::io::Result<()> {
        let queue = self.queue.lock().expect("queue lock").clone();
        let Some(queue) = queue else {
            return Err(std::io::Error::other("the capture has ended"));
        };
        for p in pieces {
            queue
                .send(p)
                .map_err(|_| std::io::Error::other("the archive writer has stopped"))?;
        }
        Ok(())
    }

    fn check(&self) -> std::io::Result<()> {
        match self.failure.lock().expect("failure lock").as_ref() {
            Some(msg) => Err(std::io::Error::other(msg.clone())),
            None => Ok(()),
        }
    }

    fn fail(&self, msg: String) -> std::io::Error {
        self.failure
            .lock()
            .expect("failure lock")
            .get_or_insert(msg.clone());
        std::io::Error::other(msg)
    }
}

impl NbdSink for DriveSink {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        let pieces = self
            .assembler
            .lock()
            .expect("assembler lock")
            .write(offset, data)
            .map_err(|e| self.fail(e.to_string()))?;
        self.push(pieces)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check()?;
        let pieces = self
            .assembler
            .lock()
            .expect("assembler lock")
            .write_zeroes(offset, len)
            .map_err(|e| self.fail(e.to_string()))?;
        self.push(pieces)
    }

    fn flush(&self) -> std::io::Result<()> {
        // The archive is synced once, when complete; a backup target needs
        // no durability before that (the job is not finalized until then).
        self.check()
    }
}

/// The writer thread: store pieces until every sender is gone.
fn write_pieces(
    mut writer: Writer<AtomicFile>,
    rx: crossbeam_channel::Receiver<Piece>,
    failure: &Mutex<Option<String>>,
) -> Result<Writer<AtomicFile>> {
    for piece in rx {
        let stored = match piece {
            Piece::Data {
                drive,
                cluster,
                bytes,
            } => writer.write_cluster(drive, cluster, &bytes),
            Piece::Zeros { drive, clusters } => writer.write_zeros(drive, clusters),
        };
        if let Err(e) = stored {
            failure
                .lock()
                .expect("failure lock")
                .get_or_insert(format!("writing the archive: {e}"));
            return Err(e.into());
        }
    }
    Ok(writer)
}

/// After the jobs: check every drive, mark what an incremental job did not
/// copy as unchanged, and write the index.
/// With `interrupted`, every drive is marked so (see
/// [`vma_core::format::DriveRecord::interrupted`]).
fn finish_archive(
    mut writer: Writer<AtomicFile>,
    drives: &[Drive],
    sinks: &[Arc<DriveSink>],
    interrupted: bool,
) -> Result<(AtomicFile, WriteSummary, Vec<DriveStats>)> {
    let mut stored = Vec::new();
    for (d, s) in drives.iter().zip(sinks) {
        let a = s.assembler.lock().expect("assembler lock");
        if interrupted {
            // Clusters QEMU only started are still dirty in its bitmap.
            writer.mark_interrupted(d.id)?;
        } else if let Some(r) = a.incomplete().first() {
            return Err(CaptureError::Invalid(format!(
                "drive {}: QEMU wrote only part of bytes {}..{}",
                d.name, r.start, r.end
            )));
        }
        let gaps = a.done().gaps(clusters_for(d.size));
        stored.push(DriveStats {
            clusters: a.done().len(),
            out_of_order: a.out_of_order(),
            unchanged: gaps.iter().map(|g| g.end - g.start).sum(),
        });
        if gaps.is_empty() {
            continue;
        }
        if d.base_bitmap.is_none() && !interrupted {
            let g = &gaps[0];
            return Err(CaptureError::Invalid(format!(
                "drive {}: the full backup job finished without sending clusters {}..{} (bytes {}..{})",
                d.name,
                g.start,
                g.end,
                g.start * 65536,
                (g.end * 65536).min(d.size)
            )));
        }
        for g in gaps {
            writer.write_unchanged(d.id, g)?;
        }
    }
    let (out, summary) = writer.finish()?;
    Ok((out, summary, stored))
}

pub(crate) fn checkpoint_of(d: &Drive) -> DriveCheckpoint {
    DriveCheckpoint {
        name: d.name.clone(),
        node: d.node.clone(),
        size: d.size,
        bitmap: d.bitmap.clone(),
        backup: if d.base_bitmap.is_some() {
            "incremental".into()
        } else {
            "full".into()
        },
        reason: d.reason.clone(),
    }
}

/// The parent's reference (uuid + archive digest) and capture record.
fn read_parent(path: &Path) -> Result<(ParentRef, CaptureRecord)> {
    let reader = Reader::open(path)?;
    let footer = reader.footer().ok_or_else(|| {
        CaptureError::Invalid(format!(
            "{}: a VMA v1 archive cannot be the parent of an incremental capture",
            path.display()
        ))
    })?;
    let header = reader.header();
    let blob = header
        .configs
        .iter()
        .find(|c| c.name == CAPTURE_BLOB)
        .ok_or_else(|| {
            CaptureError::Invalid(format!(
                "{} was not made by vma capture (it has no {CAPTURE_BLOB}), so it has no checkpoints",
                path.display()
            ))
        })?;
    let record: CaptureRecord = serde_json::from_slice(&blob.data).map_err(|e| {
        CaptureError::Invalid(format!(
            "{}: unreadable {CAPTURE_BLOB}: {e}",
            path.display()
        ))
    })?;
    Ok((
        ParentRef {
            uuid: header.uuid,
            digest: footer.archive_digest,
        },
        record,
    ))
}

/// Decide whether drive `d` can be backed up incrementally from `parent`:
/// the parent captured it with a bitmap that is still present, recording,
/// consistent and not in use, and its size has not changed. Otherwise it is
/// backed up in full and `d.reason` says why.
fn decide_incremental(qmp: &Qmp, d: &mut Drive, parent: &CaptureRecord) -> Result<()> {
    let Some(p) = parent.drives.iter().find(|p| p.name == d.name) else {
        d.reason = Some("not in the parent archive".into());
        return Ok(());
    };
    if p.size != d.size {
        d.reason = Some(format!("size changed from {} to {} bytes", p.size, d.size));
        return Ok(());
    }
    let nodes = qmp.query_named_block_nodes()?;
    let bitmaps = nodes
        .iter()
        .find(|n| n.node_name == d.node)
        .and_then(|n| n.dirty_bitmaps.clone())
        .unwrap_or_default();
    let reason = match bitmaps.iter().find(|b| b.name == p.bitmap) {
        None => Some(format!("bitmap {} is missing on node {}", p.bitmap, d.node)),
        Some(b) if b.inconsistent => Some(format!("bitmap {} is inconsistent", p.bitmap)),
        Some(b) if !b.recording => Some(format!("bitmap {} is not recording", p.bitmap)),
        Some(b) if b.busy => Some(format!("bitmap {} is in use by another job", p.bitmap)),
        Some(_) => None,
    };
    match reason {
        Some(r) => d.reason = Some(r),
        None => d.base_bitmap = Some(p.bitmap.clone()),
    }
    Ok(())
}

/// Resolve the drives to capture: each spec names a node (`query-named-
/// block-nodes`) or a device (`query-block`, whose medium's node is used).
pub(crate) fn find_drives(qmp: &Qmp, specs: &[DriveSpec]) -> Result<Vec<Drive>> {
    let nodes = qmp.query_named_block_nodes()?;
    let devices = qmp.query_block()?;
    let mut chosen: Vec<(String, String)> = Vec::new(); // (node, name)
    if specs.is_empty() {
        for dev in &devices {
            let Some(ins) = &dev.inserted else { continue };
            let name = if dev.device.is_empty() {
                dev.qdev.clone().unwrap_or_else(|| ins.node_name.clone())
            } else {
                dev.device.clone()
            };
            chosen.push((ins.node_name.clone(), name));
        }
        if chosen.is_empty() {
            return Err(CaptureError::Invalid(
                "QEMU lists no device with a medium; name the nodes with --drive NODE[=NAME]"
                    .into(),
            ));
        }
    }
    for spec in specs {
        let (node, default_name) = if nodes.iter().any(|n| n.node_name == spec.node) {
            (spec.node.clone(), spec.node.clone())
        } else if let Some(ins) = devices
            .iter()
            .find(|d| d.device == spec.node || d.qdev.as_deref() == Some(&spec.node))
            .and_then(|d| d.inserted.as_ref())
        {
            (ins.node_name.clone(), spec.node.clone())
        } else {
            return Err(CaptureError::Invalid(format!(
                "QEMU has no block node or device named {:?}",
                spec.node
            )));
        };
        chosen.push((node, spec.name.clone().unwrap_or(default_name)));
    }
    let mut seen = HashMap::new();
    let mut drives = Vec::new();
    for (i, (node, name)) in chosen.into_iter().enumerate() {
        vma_core::format::check_name(&name).map_err(|e| {
            CaptureError::Invalid(format!(
                "drive name {name:?}: {e} (give one with --drive NODE=NAME)"
            ))
        })?;
        if let Some(prev) = seen.insert(name.clone(), node.clone()) {
            return Err(CaptureError::Invalid(format!(
                "nodes {prev} and {node} would both be drive {name:?}"
            )));
        }
        let info = nodes.iter().find(|n| n.node_name == node).ok_or_else(|| {
            CaptureError::Invalid(format!(
                "block node {node} is not listed by query-named-block-nodes"
            ))
        })?;
        if i >= 255 {
            return Err(CaptureError::Invalid(
                "an archive holds at most 255 drives".into(),
            ));
        }
        drives.push(Drive {
            id: DriveId(i as u8 + 1),
            name,
            node: node.clone(),
            size: info.image.virtual_size,
            base_bitmap: None,
            reason: None,
            bitmap: String::new(),
            persistent: info.drv == "qcow2",
        });
    }
    Ok(drives)
}

pub(crate) fn hex_uuid(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn io_err(what: &str, source: std::io::Error) -> CaptureError {
    CaptureError::Io {
        what: what.into(),
        source,
    }
}

/// Value helper for tests and callers that want the record of an archive.
pub fn capture_record(header: &vma_core::Header) -> Option<CaptureRecord> {
    header
        .configs
        .iter()
        .find(|c| c.name == CAPTURE_BLOB)
        .and_then(|c| serde_json::from_slice(&c.data).ok())
}

//! Capture by backup jobs: QEMU copies each drive into us.
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
//! The new checkpoints and, for an incremental capture, the parent's are
//! named in the capture record ([`crate::record`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vma_core::chain::Chain;
use vma_core::storage::Sink;
use vma_core::types::clusters_for;
use vma_core::write::writer::WriteSummary;
use vma_core::{ArchiveMeta, Writer};
use vma_nbd::{Export, ExportFlags, NbdExport, NbdServer};

use crate::assemble::{AssembleError, ClusterAssembler, Piece};
use crate::error::{io_err, CaptureError, Result};
use crate::fleece::Fleece;
use crate::options::{
    partial_name, BitmapMode, CaptureOptions, CaptureSummary, DriveStats, JobProgress,
};
use crate::qmp::*;
use crate::record::{add_record, read_parent, CaptureRecord};
use crate::session::{self, checkpoint_bitmap, checkpoint_of, find_drives, Drive};

/// Pieces waiting for the archive writer, at most (64 KiB each: 64 MiB).
const QUEUE_PIECES: usize = 1024;

/// Capture by backup jobs (see the module documentation); `options` was
/// checked by [`crate::capture::capture`].
pub(crate) fn capture_by_backup(
    options: &CaptureOptions,
    cancel: &AtomicBool,
    mut progress: impl FnMut(JobProgress),
) -> Result<CaptureSummary> {
    let (qmp, cleared) = session::connect(options)?;
    let parent = options.parent.as_deref().map(read_parent).transpose()?;
    // The parent's chain gives the leaves of what stays unchanged (every
    // drive of the archive gets the drive digest of its point in time),
    // and the VM configs of the parent's point in time, which go forward
    // unless new ones are given.
    let parent_chain = options
        .parent
        .as_deref()
        .map(|p| Chain::open(p, &options.chain_parents).map(Arc::new))
        .transpose()?;
    let configs = match &parent_chain {
        Some(chain) if options.configs.is_empty() => chain.point_configs().vm_configs(),
        _ => options.configs.clone(),
    };
    let mut meta = ArchiveMeta::new(Vec::new(), configs);
    let mut drives = find_drives(&qmp, &options.drives)?;
    let uuid_hex = session::name_checkpoints(&mut drives, &meta);
    if let Some((_, record)) = &parent {
        for d in &mut drives {
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

    // An upper bound of the archive's size, to size an upload's parts.
    let expected = drives.iter().map(|d| d.size).sum::<u64>() + (64 << 20);
    let out = vma_core::storage::create(&options.archive, options.force, Some(expected))?;
    let has_parent = meta.parent.is_some();
    let mut writer = Writer::new(out, meta, &options.writer)?;
    if let (true, Some(chain)) = (has_parent, &parent_chain) {
        writer.set_leaf_source(chain.leaf_source());
    }
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
                size: d.size,
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
            .map(|(d, s)| Export::new(d.name.clone(), s.clone() as Arc<dyn NbdExport>))
            .collect(),
    )
    .map_err(|e| {
        io_err(
            &format!("starting the NBD server on {}", socket.display()),
            e,
        )
    })?;

    let mut jobs = Jobs {
        qmp: &qmp,
        drives: &drives,
        targets: Vec::new(),
        job_ids: Vec::new(),
        new_bitmaps: Vec::new(),
        fleece: None,
        sync_bitmaps: drives
            .iter()
            .map(|d| d.base_bitmap.clone().map(|b| (d.node.clone(), b)))
            .collect(),
        scratch_peak: 0,
        warnings: Vec::new(),
    };
    let ran = jobs.run(
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
        && jobs.abort_for_retry().is_ok();
    if ran.is_err() && !keep_partial {
        // Jobs that never started (a refused transaction) cleared nothing.
        let jobs_ran = !jobs.job_ids.is_empty();
        // Stop QEMU first (cancel the jobs, drop the NBD nodes), so nothing
        // is writing when the server goes.
        jobs.abort();
        if options.bitmap_mode == BitmapMode::Always && options.fleecing.is_none() && jobs_ran {
            // QEMU cleared what was copied from the base bitmaps, but no
            // archive keeps it: the bitmaps no longer describe the change
            // since the parent. Drop them, so the next capture of these
            // drives is full instead of silently incomplete. (Fleecing
            // jobs read frozen copies, so the bases are still whole.)
            jobs.drop_base_bitmaps();
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
                // What an earlier interrupted capture kept there is
                // superseded (this one started from it or from its parent).
                file.retarget(&partial)?;
                Ok(file.finish()?)
            }) {
            Ok(()) => Err(CaptureError::KeptForRetry {
                cause: Box::new(cause),
                partial,
            }),
            Err(e) => {
                // No archive names the checkpoints the retry would start
                // from: drop them (the next capture is full).
                for d in &drives {
                    let _ = qmp.run(&BlockDirtyBitmapRemove::new(&d.node, &d.bitmap));
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
            file.finish()?;
            Ok((summary, stored))
        });
    match finished {
        Ok((summary, stored)) => {
            jobs.finalize(options.bitmap_mode)?;
            Ok(CaptureSummary {
                drives: record.drives,
                write: summary,
                clusters_stored: stored,
                scratch_peak: options.fleecing.as_ref().map(|_| jobs.scratch_peak),
                warnings: std::mem::take(&mut jobs.warnings),
                cleared,
            })
        }
        Err(e) => {
            jobs.abort();
            Err(e)
        }
    }
}

/// The QEMU-side objects of one capture by backup jobs, for finalizing or
/// undoing.
struct Jobs<'a> {
    qmp: &'a Qmp,
    drives: &'a [Drive],
    /// NBD client nodes added.
    targets: Vec<String>,
    /// Backup job ids started (the jobs that write the archive).
    job_ids: Vec<String>,
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
fn frozen_bitmap(node: &str, name: &str) -> BlockDirtyBitmapAdd {
    BlockDirtyBitmapAdd {
        granularity: Some(65536),
        persistent: Some(false),
        disabled: Some(true),
        ..BlockDirtyBitmapAdd::new(node, name)
    }
}

/// Merge bitmap `name` of `from` into bitmap `target` of `node`.
fn merge_from(node: &str, target: &str, from: &str, name: &str) -> BlockDirtyBitmapMerge {
    BlockDirtyBitmapMerge {
        node: node.to_owned(),
        target: target.to_owned(),
        bitmaps: vec![BitmapSource::Node(BlockDirtyBitmap::new(from, name))],
    }
}

impl Jobs<'_> {
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
            let server = SocketAddress::Unix(UnixSocketAddress {
                path: socket.to_path_buf(),
            });
            let export = d.name.clone();
            let nbd = BlockdevOptions::new(&target, Driver::Nbd { server, export });
            self.qmp.run(&BlockdevAdd(nbd))?;
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
        let mut transaction = Transaction::new();
        let mut added = Vec::new();
        for (i, d) in self.drives.iter().enumerate() {
            transaction.push(&checkpoint_bitmap(d));
            added.push((d.node.clone(), d.bitmap.clone()));
            match &self.fleece {
                Some(fleece) => {
                    if let Some(base) = &d.base_bitmap {
                        // The base as it is at the point in time: the
                        // backup job reads it after the transaction.
                        let frozen = frozen_name(&d.bitmap);
                        transaction.push(&frozen_bitmap(&d.node, &frozen));
                        transaction.push(&merge_from(&d.node, &frozen, &d.node, base));
                        added.push((d.node.clone(), frozen));
                    }
                    transaction.push(&fleece.start_action(i));
                }
                None => {
                    let backup = self.backup(i, &d.node, d.base_bitmap.as_deref(), options);
                    transaction.push(&backup);
                }
            }
        }
        // Freeze only around the transaction: from then on copy-before-write
        // keeps the point in time, however long the copy takes.
        let (started, thawed) =
            session::run_frozen(self.qmp, options.fsfreeze.as_deref(), &transaction)?;
        started?;
        self.new_bitmaps = added;
        match &mut self.fleece {
            Some(fleece) => fleece.started(),
            None => self.job_ids = (0..self.drives.len()).map(job_id).collect(),
        }
        thawed?;
        if self.fleece.is_some() {
            self.start_from_views(options)?;
        }
        self.wait_pending(cancel, failure, progress)
    }

    /// Drive `i`'s backup job, reading `source` (with `bitmap` on it when
    /// incremental).
    fn backup(
        &self,
        i: usize,
        source: &str,
        bitmap: Option<&str>,
        options: &CaptureOptions,
    ) -> BlockdevBackup {
        let sync = match bitmap {
            Some(_) => SyncMode::Bitmap,
            None => SyncMode::Full,
        };
        BlockdevBackup {
            bitmap: bitmap.map(str::to_owned),
            bitmap_mode: bitmap.map(|_| options.bitmap_mode.into()),
            speed: (options.speed > 0).then_some(options.speed),
            auto_finalize: Some(false),
            auto_dismiss: Some(false),
            // Cluster size 64 KiB even on sources with smaller clusters
            // (`x-perf.min-cluster-size` exists since QEMU 9.1).
            x_perf: (self.qmp.version() >= QemuVersion::new(9, 1, 0)).then_some(BackupPerf {
                min_cluster_size: 65536,
            }),
            ..BlockdevBackup::new(&job_id(i), source, &self.targets[i], sync)
        }
    }

    /// With fleecing, after the transaction: add the views, move each
    /// frozen base bitmap onto its view (a backup job reads bitmaps of its
    /// source node), and start the backup jobs from the views with
    /// `discard-source`, so scratch space is released as they copy.
    fn start_from_views(&mut self, options: &CaptureOptions) -> Result<()> {
        let fleece = self.fleece.as_mut().expect("fleecing");
        fleece.open_views()?;
        let mut transaction = Transaction::new();
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
                    self.qmp.run(&frozen_bitmap(&view, &frozen))?;
                    self.qmp
                        .run(&merge_from(&view, &frozen, &d.node, &frozen))?;
                    self.qmp
                        .run(&BlockDirtyBitmapRemove::new(&d.node, &frozen))?;
                    self.new_bitmaps
                        .retain(|(n, b)| !(n == &d.node && b == &frozen));
                    self.sync_bitmaps[i] = Some((view.clone(), frozen.clone()));
                    Some(frozen)
                }
                None => None,
            };
            let backup = BlockdevBackup {
                discard_source: Some(true),
                ..self.backup(i, &view, bitmap.as_deref(), options)
            };
            transaction.push(&backup);
        }
        self.qmp.run(&transaction)?;
        self.job_ids = (0..self.drives.len()).map(job_id).collect();
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
            let jobs = self.qmp.run(&QueryJobs)?;
            if let Some(fleece) = &self.fleece {
                fleece.check_running(&jobs, &names)?;
                self.scratch_peak = self.scratch_peak.max(fleece.scratch_bytes());
            }
            let mut p = JobProgress::default();
            let mut pending = 0;
            for (i, id) in self.job_ids.iter().enumerate() {
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
            if pending == self.job_ids.len() {
                return Ok(());
            }
        }
    }

    /// Finalize and dismiss the jobs, then drop what the capture added
    /// besides the new checkpoints. Unless the mode is `never`, the
    /// parent's bitmaps were consumed by the jobs and are removed.
    fn finalize(&mut self, mode: BitmapMode) -> Result<()> {
        for id in &self.job_ids {
            self.qmp.run(&JobFinalize::new(id))?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in std::mem::take(&mut self.job_ids) {
            loop {
                let jobs = self.qmp.run(&QueryJobs)?;
                match jobs.iter().find(|j| j.id == id) {
                    Some(j) if j.status == JobStatus::Concluded => break,
                    Some(_) if Instant::now() < deadline => {
                        let _ = self.qmp.next_event(Duration::from_millis(50))?;
                    }
                    _ => break,
                }
            }
            let _ = self.qmp.run(&JobDismiss::new(&id));
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
        let jobs = std::mem::take(&mut self.job_ids);
        let _ = self.qmp.cancel_jobs(&jobs, Duration::from_secs(30));
        for id in jobs {
            let _ = self.qmp.run(&JobDismiss::new(&id));
        }
        self.remove_fleece();
        self.remove_targets();
        for (node, name) in std::mem::take(&mut self.new_bitmaps) {
            let _ = self.qmp.run(&BlockDirtyBitmapRemove::new(&node, &name));
        }
    }

    /// Undo for a retry (`always`): cancel and dismiss the jobs, remove the
    /// targets, fold each bitmap the jobs read (QEMU cleared what they
    /// copied from it) into the new checkpoint and drop the base.
    fn abort_for_retry(&mut self) -> Result<()> {
        if self.job_ids.len() != self.drives.len() {
            return Err(CaptureError::Invalid(
                "the backup jobs never started".into(),
            ));
        }
        if !self
            .qmp
            .cancel_jobs(&self.job_ids, Duration::from_secs(30))?
        {
            return Err(CaptureError::Invalid(
                "the backup jobs did not stop within 30 s of being cancelled".into(),
            ));
        }
        for id in std::mem::take(&mut self.job_ids) {
            self.qmp.run(&JobDismiss::new(&id))?;
        }
        for (d, read) in self.drives.iter().zip(&self.sync_bitmaps) {
            let base = d.base_bitmap.as_deref().expect("incremental");
            let (node, bitmap) = read.as_ref().expect("incremental drives read a bitmap");
            self.qmp
                .run(&merge_from(&d.node, &d.bitmap, node, bitmap))?;
            self.qmp.run(&BlockDirtyBitmapRemove::new(&d.node, base))?;
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
                let _ = self.qmp.run(&BlockDirtyBitmapRemove::new(&d.node, base));
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
            let _ = self.qmp.run(&BlockdevDel { node_name: t });
        }
    }
}

fn job_id(i: usize) -> String {
    format!("vma-backup-{i}")
}

/// The NBD sink of one drive: assembles clusters and queues them for the
/// archive writer.
struct DriveSink {
    size: u64,
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

    /// Hand a write to the assembler and queue the clusters it completes.
    fn assemble(
        &self,
        write: impl FnOnce(&mut ClusterAssembler) -> std::result::Result<Vec<Piece>, AssembleError>,
    ) -> std::io::Result<()> {
        self.check()?;
        let mut assembler = self.assembler.lock().expect("assembler lock");
        let pieces = write(&mut assembler).map_err(|e| self.fail(e.to_string()))?;
        drop(assembler);
        self.push(pieces)
    }

    fn fail(&self, msg: String) -> std::io::Error {
        self.failure
            .lock()
            .expect("failure lock")
            .get_or_insert(msg.clone());
        std::io::Error::other(msg)
    }
}

impl NbdExport for DriveSink {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags::WRITE_ONLY
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.assemble(|a| a.write(offset, data))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.assemble(|a| a.write_zeroes(offset, len))
    }

    fn flush(&self) -> std::io::Result<()> {
        // The archive is synced once, when complete; a backup target needs
        // no durability before that (the job is not finalized until then).
        self.check()
    }
}

/// The writer thread: store pieces until every sender is gone.
fn write_pieces(
    mut writer: Writer<Box<dyn Sink>>,
    rx: crossbeam_channel::Receiver<Piece>,
    failure: &Mutex<Option<String>>,
) -> Result<Writer<Box<dyn Sink>>> {
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
    mut writer: Writer<Box<dyn Sink>>,
    drives: &[Drive],
    sinks: &[Arc<DriveSink>],
    interrupted: bool,
) -> Result<(Box<dyn Sink>, WriteSummary, Vec<DriveStats>)> {
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
    let nodes = qmp.run(&QueryNamedBlockNodes { flat: true })?;
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

//! Point-in-time views of live drives ("fleecing").
//!
//! For each drive a scratch qcow2 image of the drive's size is created in a
//! scratch directory and added as a node. A `blockdev-backup` job with
//! `sync: none` from the drive to the scratch node (started in the caller's
//! `transaction`, together with the checkpoint bitmaps) inserts its
//! `copy-before-write` filter above the drive, into every parent the drive
//! has (guest devices and exports alike): from then on a guest write first
//! copies the old contents of its clusters into the scratch image, a local
//! copy. A `snapshot-access` node on top of that filter is the drive as it
//! was when the transaction ran: it reads copied clusters from the scratch
//! image and the others from the drive. Discards on the view drop clusters
//! from the scratch image and stop copy-before-write for them, so a backup
//! job reading the view with `discard-source` releases scratch space as it
//! goes.
//!
//! Why the job's filter and not a filter added with `blockdev-add`: QEMU
//! 10.0 can only put a `blockdev-add`ed filter into a guest's write path
//! with `qom-set` on a guest device's `drive` property (which exports and
//! `qemu-storage-daemon` do not have), and neither that nor `blockdev-add`
//! is a `transaction` action, so the checkpoint bitmap could not start at
//! the same instant. The job's filter is inserted live and atomically. Its
//! one difference: its `on-cbw-error` is QEMU's default,
//! `break-guest-write` (it cannot be reopened), so a failed write into the
//! scratch image (a full scratch file system) fails the guest's write.
//!
//! `Fleece::teardown` removes everything again, in the order QEMU needs:
//! exports, views, the jobs (which takes the filter out of the guest's
//! path), scratch nodes, scratch files, and QEMU's NBD server if it was
//! started here.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vma_core::atomic::AtomicFile;
use vma_core::image::qcow2::write::Qcow2Writer;

use crate::error::{CaptureError, Result};
use crate::qmp::{
    self, BackupPerf, BlockExportAdd, BlockExportDel, BlockdevAdd, BlockdevBackup, BlockdevDel,
    BlockdevOptions, BlockdevRef, Cache, Discard, Driver, JobDismiss, JobInfo, JobStatus,
    NbdServerStart, NbdServerStop, QemuVersion, Qmp, QueryBlockExports, SocketAddressLegacy,
    SyncMode, UnixSocketAddress,
};

/// Oldest QEMU whose backup jobs have `discard-source` (and whose
/// `snapshot-access` the fleecing here was tested with).
pub const MIN_QEMU: QemuVersion = QemuVersion::new(9, 1, 0);

/// The fleecing objects of one drive.
#[derive(Debug)]
struct View {
    /// The drive's node.
    node: String,
    scratch_file: PathBuf,
    scratch_created: bool,
    scratch_node: String,
    scratch_added: bool,
    /// Node name of the job's copy-before-write filter.
    filter: String,
    job: String,
    job_started: bool,
    /// The snapshot-access node.
    view: String,
    view_added: bool,
    /// Export id and name, once exported.
    export: Option<(String, String)>,
}

/// Fleecing views of some drives of one QEMU; removed by
/// [`Fleece::teardown`] (and, as a last resort, on drop).
pub(crate) struct Fleece<'q> {
    qmp: &'q Qmp,
    views: Vec<View>,
    /// QEMU's NBD server socket, when this capture started the server.
    started_server: Option<PathBuf>,
}

impl<'q> Fleece<'q> {
    /// Create a scratch image per drive (`(node, size)`) in `dir` and add
    /// it as a node. `tag` keeps file and export names apart from other
    /// captures'.
    pub(crate) fn prepare(
        qmp: &'q Qmp,
        dir: &Path,
        drives: &[(String, u64)],
        tag: &str,
    ) -> Result<Fleece<'q>> {
        if qmp.version() < MIN_QEMU {
            return Err(CaptureError::Invalid(format!(
                "fleecing needs QEMU {MIN_QEMU} or later (backup jobs with discard-source); this QEMU is {}",
                qmp.version()
            )));
        }
        if !dir.is_dir() {
            return Err(CaptureError::Invalid(format!(
                "scratch directory {} does not exist",
                dir.display()
            )));
        }
        let dir = std::fs::canonicalize(dir).map_err(|e| CaptureError::Io {
            what: format!("resolving the scratch directory {}", dir.display()),
            source: e,
        })?;
        let mut fleece = Fleece {
            qmp,
            views: drives
                .iter()
                .enumerate()
                .map(|(i, (node, _))| View {
                    node: node.clone(),
                    scratch_file: dir.join(format!("vma-scratch-{tag}-{i}.qcow2")),
                    scratch_created: false,
                    scratch_node: format!("vma-scratch-{i}"),
                    scratch_added: false,
                    filter: format!("vma-cbw-{i}"),
                    job: format!("vma-fleece-{i}"),
                    job_started: false,
                    view: format!("vma-view-{i}"),
                    view_added: false,
                    export: None,
                })
                .collect(),
            started_server: None,
        };
        for (v, (_, size)) in fleece.views.iter_mut().zip(drives) {
            create_scratch(&v.scratch_file, *size)?;
            v.scratch_created = true;
            // Nothing in a scratch image needs to survive a crash: no
            // flushes, which qcow2 would otherwise issue between metadata
            // updates while a guest write waits for its copy.
            let file = BlockdevOptions {
                discard: Some(Discard::Unmap),
                cache: Some(Cache { no_flush: true }),
                ..BlockdevOptions::unnamed(Driver::File {
                    filename: v.scratch_file.clone(),
                })
            };
            let file = BlockdevRef::Options(Box::new(file));
            let scratch = BlockdevOptions {
                discard: Some(Discard::Unmap),
                cache: Some(Cache { no_flush: true }),
                ..BlockdevOptions::new(&v.scratch_node, Driver::Qcow2 { file })
            };
            qmp.run(&BlockdevAdd(scratch))?;
            v.scratch_added = true;
        }
        Ok(fleece)
    }

    /// The `transaction` action that starts fleecing drive `i`.
    pub(crate) fn start_action(&self, i: usize) -> BlockdevBackup {
        let v = &self.views[i];
        BlockdevBackup {
            filter_node_name: Some(v.filter.clone()),
            auto_finalize: Some(false),
            auto_dismiss: Some(false),
            x_perf: Some(BackupPerf {
                min_cluster_size: 65536,
            }),
            ..BlockdevBackup::new(&v.job, &v.node, &v.scratch_node, SyncMode::None)
        }
    }

    /// The transaction with every [`Fleece::start_action`] has run.
    pub(crate) fn started(&mut self) {
        for v in &mut self.views {
            v.job_started = true;
        }
    }

    /// Add the `snapshot-access` view of every drive.
    pub(crate) fn open_views(&mut self) -> Result<()> {
        for v in &mut self.views {
            let file = BlockdevRef::Node(v.filter.clone());
            let view = BlockdevOptions {
                discard: Some(Discard::Unmap),
                ..BlockdevOptions::new(&v.view, Driver::SnapshotAccess { file })
            };
            self.qmp.run(&BlockdevAdd(view))?;
            v.view_added = true;
        }
        Ok(())
    }

    /// Node name of drive `i`'s view.
    pub(crate) fn view_node(&self, i: usize) -> &str {
        &self.views[i].view
    }

    /// Export every view read-only over QEMU's NBD server: the one already
    /// listening on `server` if given, else one started on `own_socket`.
    /// Returns the socket and the export names, in drive order.
    pub(crate) fn export_views(
        &mut self,
        server: Option<&Path>,
        own_socket: &Path,
        tag: &str,
    ) -> Result<(PathBuf, Vec<String>)> {
        let socket = match server {
            Some(path) => path.to_path_buf(),
            None => {
                let started = self.qmp.run(&NbdServerStart {
                    addr: SocketAddressLegacy::Unix(UnixSocketAddress {
                        path: own_socket.to_path_buf(),
                    }),
                });
                match started {
                    Ok(_) => {}
                    Err(qmp::Error::Command { desc, .. }) if desc.contains("already running") => {
                        return Err(CaptureError::Invalid(format!(
                            "QEMU already runs an NBD server ({desc}), and a QEMU has only one: \
                             give its unix socket with --qemu-nbd-socket to export the views there"
                        )));
                    }
                    Err(e) => return Err(e.into()),
                }
                self.started_server = Some(own_socket.to_path_buf());
                own_socket.to_path_buf()
            }
        };
        let mut names = Vec::new();
        for (i, v) in self.views.iter_mut().enumerate() {
            let id = format!("vma-export-{i}");
            let name = format!("vma-view-{tag}-{i}");
            self.qmp
                .run(&BlockExportAdd::nbd(&id, &v.view, &name, false))?;
            v.export = Some((id, name.clone()));
            names.push(name);
        }
        Ok((socket, names))
    }

    /// Check that every fleecing job still runs (`jobs`: a `query-jobs`
    /// answer); `names` gives the drive names for the message.
    pub(crate) fn check_running(&self, jobs: &[JobInfo], names: &[String]) -> Result<()> {
        for (v, name) in self.views.iter().zip(names) {
            let Some(j) = jobs.iter().find(|j| j.id == v.job) else {
                return Err(CaptureError::Job {
                    drive: name.clone(),
                    error: format!("the fleecing job {} disappeared", v.job),
                });
            };
            if matches!(
                j.status,
                JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
            ) {
                return Err(CaptureError::Job {
                    drive: name.clone(),
                    error: format!(
                        "the fleecing job stopped: {}",
                        j.error.clone().unwrap_or_else(|| j.status.to_string())
                    ),
                });
            }
        }
        Ok(())
    }

    /// Bytes the scratch images take on disk now.
    pub(crate) fn scratch_bytes(&self) -> u64 {
        self.views
            .iter()
            .filter_map(|v| std::fs::metadata(&v.scratch_file).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Remove everything fleecing added, best effort and in order (QEMU
    /// may be gone). Returns what could not be removed.
    pub(crate) fn teardown(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        let qmp = self.qmp;
        let mut exports = Vec::new();
        for v in &mut self.views {
            if let Some((id, _)) = v.export.take() {
                if let Err(e) = qmp.run(&BlockExportDel::hard(&id)) {
                    left.push(format!("NBD export {id}: {e}"));
                }
                exports.push(id);
            }
        }
        // Deleting an export finishes in the background; the view is in
        // use until then.
        wait_exports_gone(qmp, &exports);
        for v in &mut self.views {
            if v.view_added {
                match qmp.run(&BlockdevDel {
                    node_name: v.view.clone(),
                }) {
                    Ok(_) => v.view_added = false,
                    Err(e) => left.push(format!("node {}: {e}", v.view)),
                }
            }
        }
        let jobs: Vec<String> = self
            .views
            .iter()
            .filter(|v| v.job_started)
            .map(|v| v.job.clone())
            .collect();
        match qmp.cancel_jobs(&jobs, Duration::from_secs(30)) {
            Ok(true) => {}
            Ok(false) => left.push("the fleecing jobs did not stop within 30 s".into()),
            Err(e) => left.push(format!("fleecing jobs: {e}")),
        }
        for v in &mut self.views {
            if v.job_started {
                let _ = qmp.run(&JobDismiss::new(&v.job));
                v.job_started = false;
            }
        }
        for v in &mut self.views {
            if v.scratch_added {
                match qmp.run(&BlockdevDel {
                    node_name: v.scratch_node.clone(),
                }) {
                    Ok(_) => v.scratch_added = false,
                    Err(e) => left.push(format!("node {}: {e}", v.scratch_node)),
                }
            }
            if v.scratch_created {
                match std::fs::remove_file(&v.scratch_file) {
                    Ok(()) => v.scratch_created = false,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => v.scratch_created = false,
                    Err(e) => left.push(format!("{}: {e}", v.scratch_file.display())),
                }
            }
        }
        if let Some(socket) = self.started_server.take() {
            if let Err(e) = qmp.run(&NbdServerStop) {
                left.push(format!("QEMU's NBD server: {e}"));
            }
            let _ = std::fs::remove_file(socket);
        }
        left
    }
}

impl Drop for Fleece<'_> {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// An empty qcow2 image of `size` bytes at `path` (which must not exist).
fn create_scratch(path: &Path, size: u64) -> Result<()> {
    if path.exists() {
        return Err(CaptureError::Invalid(format!(
            "scratch image {} exists already (left by a capture that was killed?); remove it",
            path.display()
        )));
    }
    let image = Qcow2Writer::new(AtomicFile::create(path)?, size, false)?;
    image.finish()?.commit()?;
    Ok(())
}

/// Wait (a few seconds at most) until `query-block-exports` lists none of
/// the export ids `ids`.
fn wait_exports_gone(qmp: &Qmp, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(list) = qmp.run(&QueryBlockExports) else {
            return;
        };
        let listed = list.iter().any(|e| ids.contains(&e.id));
        if !listed {
            return;
        }
        let _ = qmp.next_event(Duration::from_millis(50));
    }
}

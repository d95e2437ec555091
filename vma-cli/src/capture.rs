//! `vma capture`: back up drives of a running QEMU over QMP.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use vma_capture::capture::{capture as run_capture, BitmapMode, CaptureOptions, DriveSpec};
use vma_core::util::human_bytes;

use crate::output::Progress;
use crate::{read_configs, OutputArgs};

/// Arguments of `vma capture`.
#[derive(clap::Args, Debug)]
pub(crate) struct CaptureArgs {
    /// QMP unix socket of the running QEMU (or qemu-storage-daemon).
    #[arg(long, value_name = "SOCKET")]
    qmp: PathBuf,
    /// Archive to write.
    archive: PathBuf,
    /// Block node or device to back up, optionally named in the archive
    /// (repeatable; default: every device with a medium).
    #[arg(long = "drive", value_name = "NODE[=NAME]")]
    drives: Vec<String>,
    /// Config blob as [NAME=]FILE (repeatable; default for an incremental
    /// capture: the VM configs of its parent's point in time, carried
    /// forward).
    #[arg(long = "config", value_name = "[NAME=]FILE")]
    configs: Vec<String>,
    /// Back up only what changed since this archive (made by `vma capture`),
    /// using the dirty bitmaps it started.
    #[arg(long, value_name = "PARENT_ARCHIVE")]
    incremental_from: Option<PathBuf>,
    /// What an incremental backup does to the parent's bitmap.
    #[arg(long, value_enum, default_value = "on-success")]
    bitmap_mode: BitmapModeArg,
    /// Speed limit of the backup jobs, or of reading the views with
    /// --diff-against, in bytes per second (0: none).
    #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = 0)]
    speed: u64,
    #[command(flatten)]
    output_options: OutputArgs,
    /// Guest agent socket: freeze the guest's file systems while the jobs
    /// start (only then), and always thaw them.
    #[arg(long, value_name = "QGA_SOCKET")]
    fsfreeze: Option<PathBuf>,
    /// Fleece through scratch qcow2 images in this directory: a guest write
    /// then only copies old data into a local scratch image, never waits
    /// for the archive (for slow archive targets).
    #[arg(long, value_name = "SCRATCH_DIR")]
    fleecing: Option<PathBuf>,
    /// Compare a point-in-time view of each drive with this archive (the
    /// newest of its chain) and store only the clusters that differ,
    /// starting new checkpoint bitmaps (no bitmaps needed in the parent).
    #[arg(long, value_name = "PARENT", conflicts_with = "incremental_from")]
    diff_against: Option<PathBuf>,
    /// An ancestor of the --diff-against or --incremental-from archive
    /// (repeatable; to compare against, or to find the VM configs it
    /// carries forward); by default they are looked for beside it, by uuid.
    #[arg(long = "parent", value_name = "PATH")]
    parents: Vec<PathBuf>,
    /// With --diff-against, when QEMU already runs its (one) NBD server:
    /// that server's unix socket, to export the views there.
    #[arg(long, value_name = "SOCKET", requires = "diff_against")]
    qemu_nbd_socket: Option<PathBuf>,
}

/// `--bitmap-mode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BitmapModeArg {
    /// The parent's bitmap is consumed only when the backup succeeds.
    OnSuccess,
    /// The parent's bitmap is left as it is (differential backups).
    Never,
    /// Also on failure: what was copied is kept in ARCHIVE.partial, and a
    /// retry from it copies only the rest.
    Always,
}

/// Set by SIGINT, SIGTERM and SIGHUP (see `signals`): the capture cancels
/// its jobs and keeps nothing.
pub(crate) static CANCEL: AtomicBool = AtomicBool::new(false);

pub(crate) fn capture(args: &CaptureArgs, quiet: bool) -> Result<()> {
    if !args.parents.is_empty() && args.diff_against.is_none() && args.incremental_from.is_none() {
        bail!("--parent names ancestors of --diff-against or --incremental-from; give one of them");
    }
    let drives = args
        .drives
        .iter()
        .map(|d| match d.split_once('=') {
            Some((node, name)) if !node.is_empty() && !name.is_empty() => Ok(DriveSpec {
                node: node.into(),
                name: Some(name.into()),
            }),
            None if !d.is_empty() => Ok(DriveSpec {
                node: d.clone(),
                name: None,
            }),
            _ => bail!("--drive {d:?}: expected NODE or NODE=NAME"),
        })
        .collect::<Result<Vec<_>>>()?;
    let options = CaptureOptions {
        qmp: args.qmp.clone(),
        archive: args.archive.clone(),
        force: args.output_options.force,
        drives,
        configs: read_configs(&args.configs)?,
        parent: args.incremental_from.clone(),
        bitmap_mode: match args.bitmap_mode {
            BitmapModeArg::OnSuccess => BitmapMode::OnSuccess,
            BitmapModeArg::Never => BitmapMode::Never,
            BitmapModeArg::Always => BitmapMode::Always,
        },
        speed: args.speed,
        writer: args.output_options.writer_options()?,
        socket_dir: None,
        fsfreeze: args.fsfreeze.clone(),
        fleecing: args.fleecing.clone(),
        diff_against: args.diff_against.clone(),
        chain_parents: args.parents.clone(),
        qemu_nbd_socket: args.qemu_nbd_socket.clone(),
    };
    if !crate::s3::is_s3_path(&args.archive) {
        crate::signals::clear_stale(args.archive.parent().unwrap_or(Path::new(".")))?;
    }
    let progress = Progress::bytes(1, "capture", quiet);
    let result = run_capture(&options, &CANCEL, |p| {
        progress.set_total(p.total);
        progress.set(p.done);
    });
    progress.finish();
    let summary = result.with_context(|| format!("capturing into {}", args.archive.display()))?;
    if !summary.cleared.is_empty() && !quiet {
        eprintln!(
            "vma: removed what an earlier capture that could not clean up left in QEMU: {}",
            summary.cleared.join(", ")
        );
    }
    for w in &summary.warnings {
        eprintln!("vma: warning: left behind: {w}");
    }
    if !quiet {
        for (d, stored) in summary.drives.iter().zip(&summary.clusters_stored) {
            let why = d
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            if let Some(parent) = &args.diff_against {
                let what = if d.backup == "incremental" {
                    format!(
                        "compared with {}: {} clusters ({}) differ, {} unchanged",
                        parent.display(),
                        stored.clusters,
                        human_bytes(stored.clusters * 65536),
                        stored.unchanged
                    )
                } else {
                    format!("stored in full{why}")
                };
                eprintln!(
                    "vma: drive {} (node {}): {what}, checkpoint {}",
                    d.name, d.node, d.bitmap
                );
                continue;
            }
            eprintln!(
                "vma: drive {} (node {}): {} backup{why}, {} clusters ({}) copied, {} out of order, checkpoint {}",
                d.name,
                d.node,
                d.backup,
                stored.clusters,
                human_bytes(stored.clusters * 65536),
                stored.out_of_order,
                d.bitmap
            );
        }
        if let Some(peak) = summary.scratch_peak {
            eprintln!("vma: scratch images took at most {}", human_bytes(peak));
        }
        eprintln!(
            "vma: wrote {} ({} stored, {} clusters arrived out of order)",
            args.archive.display(),
            human_bytes(summary.write.bytes_written),
            summary.write.out_of_order_clusters
        );
    }
    Ok(())
}

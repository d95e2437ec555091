//! `vma live-restore`: copy the drives of a VM running from `vma serve`
//! into their final storage while it runs (the orchestration is
//! `vma_capture::live_restore`).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use vma_capture::live_restore::{live_restore as run, DriveTarget, Options, Report, TargetFormat};
use vma_capture::qmp::Qmp;
use vma_core::util::human_bytes;

/// Set by SIGINT, SIGTERM or SIGHUP: cancel the jobs.
pub(crate) static CANCEL: AtomicBool = AtomicBool::new(false);

/// Arguments of `vma live-restore`.
#[derive(clap::Args, Debug)]
pub(crate) struct LiveRestoreArgs {
    /// QMP unix socket of the running QEMU (a monitor of its own: QEMU
    /// serves one client per QMP socket).
    #[arg(long, value_name = "SOCKET")]
    qmp: PathBuf,
    /// Drive to restore and where to: NODE=[format=raw|qcow2:]TARGET.
    /// NODE is the block node the guest device reads (the overlay), or
    /// the device's name or qdev id. TARGET is a file (raw: created when
    /// missing, else exactly the drive's size; qcow2: created beforehand)
    /// or a block device (at least the drive's size). Repeatable.
    #[arg(long = "drive", value_name = "NODE=TARGET", required = true)]
    drives: Vec<String>,
    /// Rate limit per drive in bytes per second (0: none).
    #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = 0)]
    speed: u64,
    /// Resumes of a copy paused by an I/O error, without progress in
    /// between, before it is given up (the VM then keeps running from the
    /// archive).
    #[arg(long, default_value_t = 5)]
    retries: u32,
}

fn parse_drive(spec: &str) -> Result<DriveTarget> {
    let Some((drive, target)) = spec.split_once('=') else {
        bail!("--drive {spec:?}: expected NODE=TARGET");
    };
    let (format, path) = match target.split_once(':') {
        Some(("format=raw", p)) => (TargetFormat::Raw, p),
        Some(("format=qcow2", p)) => (TargetFormat::Qcow2, p),
        Some((f, _)) if f.starts_with("format=") => {
            bail!("--drive {spec:?}: the format is raw or qcow2")
        }
        _ => (TargetFormat::Raw, target),
    };
    if drive.is_empty() || path.is_empty() {
        bail!("--drive {spec:?}: expected NODE=TARGET");
    }
    Ok(DriveTarget {
        drive: drive.to_string(),
        path: std::path::absolute(path).with_context(|| format!("resolving {path}"))?,
        format,
    })
}

/// `vma live-restore`.
pub(crate) fn live_restore(args: &LiveRestoreArgs, quiet: bool) -> Result<()> {
    let targets = args
        .drives
        .iter()
        .map(|d| parse_drive(d))
        .collect::<Result<Vec<_>>>()?;
    let qmp = Qmp::connect(&args.qmp)?;
    let options = Options {
        speed: args.speed,
        retries: args.retries,
        ..Options::default()
    };
    let mut say = |r: Report| {
        let line = match r {
            Report::Started {
                drive,
                source,
                size,
            } => {
                format!("{drive}: copying {} from node {source}", human_bytes(size))
            }
            Report::Progress {
                drive,
                current,
                total,
            } => {
                let pct = if total == 0 {
                    0.0
                } else {
                    current as f64 * 100.0 / total as f64
                };
                format!(
                    "{drive}: {pct:.1}% ({} of {})",
                    human_bytes(current),
                    human_bytes(total)
                )
            }
            Report::Error {
                drive,
                operation,
                message,
            } => format!("{drive}: {operation} error: {message}"),
            Report::Pivoted { drive } => {
                format!("{drive}: copy complete, the VM now uses the target")
            }
            Report::Removed { drive, node } => format!("{drive}: removed node {node}"),
        };
        let always = line.contains("error") || line.contains("complete");
        if !quiet || always {
            eprintln!("vma live-restore: {line}");
        }
    };
    let done = run(&qmp, &targets, &options, &CANCEL, &mut say)?;
    for d in &done {
        eprintln!(
            "vma live-restore: {}: restored; the VM no longer reads from vma ({} removed)",
            d.drive,
            if d.removed.is_empty() {
                "old nodes".to_string()
            } else {
                d.removed.join(", ")
            }
        );
    }
    Ok(())
}

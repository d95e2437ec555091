//! `capture --diff-against`: an incremental archive of live drives made by
//! comparison, which starts a bitmap chain after the fact (after a full
//! made without bitmaps, or when a checkpoint bitmap was lost).
//!
//! One `transaction` starts each drive's new checkpoint bitmap and its
//! fleecing job: the point in time (see [`crate::fleece`]). QEMU's NBD
//! server exports the views read-only; each is read here with the NBD
//! client as a source image and compared by vma-core's `diff_image` with
//! the same-named drive at PARENT's point in time, so only clusters that
//! differ are stored, and zero stretches of either side are not read. The
//! archive names PARENT as its parent and records the checkpoints, so a
//! later `--incremental-from` it continues with dirty bitmaps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vma_core::chain::{Chain, ChainDrive};
use vma_core::image::source::{DiskImage, Stretch};
use vma_core::ops::diff::diff_or_copy;
use vma_core::types::clusters_for;
use vma_core::write::writer::WriteSummary;
use vma_core::{ArchiveMeta, Writer};

use vma_nbd::NbdClient;

use crate::error::{CaptureError, Result};
use crate::fleece::Fleece;
use crate::nbd_image::NbdImage;
use crate::options::{CaptureOptions, CaptureSummary, DriveStats, JobProgress};
use crate::qmp::{BlockDirtyBitmapRemove, Qmp, Transaction};
use crate::record::{add_record, CaptureRecord};
use crate::session::{self, checkpoint_bitmap, checkpoint_of, find_drives, Drive};

/// Capture `options.qmp`'s drives by comparing point-in-time views of
/// them with the chain ending at `options.diff_against`.
pub(crate) fn capture_by_diff(
    options: &CaptureOptions,
    cancel: &AtomicBool,
    mut progress: impl FnMut(JobProgress),
) -> Result<CaptureSummary> {
    let against = options.diff_against.as_deref().expect("diff_against");
    if options.parent.is_some() {
        return Err(CaptureError::Invalid(
            "--diff-against and --incremental-from exclude each other".into(),
        ));
    }
    let chain = Arc::new(Chain::open(against, &options.chain_parents)?);
    chain.refuse_interrupted(|_| true)?;
    let parent = chain.newest().identity()?;
    let (qmp, cleared) = session::connect(options)?;
    // The VM configs of the parent's point in time go forward unless new
    // ones are given.
    let configs = if options.configs.is_empty() {
        chain.point_configs().vm_configs()
    } else {
        options.configs.clone()
    };
    let mut meta = ArchiveMeta::new(Vec::new(), configs);
    let mut drives = find_drives(&qmp, &options.drives)?;
    let uuid_hex = session::name_checkpoints(&mut drives, &meta);
    let mut bases = Vec::new();
    for d in &mut drives {
        let base = match chain.header().drives.iter().find(|p| p.name == d.name) {
            None => {
                d.reason = Some("not in the parent archive".into());
                None
            }
            Some(p) if p.size != d.size => {
                d.reason = Some(format!("size changed from {} to {} bytes", p.size, d.size));
                None
            }
            Some(p) => Some(ChainDrive::new(chain.clone(), p.id)?),
        };
        bases.push(base);
    }
    meta.parent = bases.iter().any(Option::is_some).then_some(parent);
    meta.drives = drives.iter().map(Drive::info).collect();
    let record = CaptureRecord {
        drives: drives
            .iter()
            .zip(&bases)
            .map(|(d, base)| {
                let mut c = checkpoint_of(d);
                if base.is_some() {
                    c.backup = "incremental".into();
                }
                c
            })
            .collect(),
    };
    add_record(&mut meta, &record)?;

    let scratch_dir = match &options.fleecing {
        Some(dir) => dir.clone(),
        // Beside an object in a store: in the temporary directory.
        None if vma_core::storage::is_remote(&options.archive) => std::env::temp_dir(),
        None => match options.archive.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    let tag = &uuid_hex[..8];
    let nodes: Vec<(String, u64)> = drives.iter().map(|d| (d.node.clone(), d.size)).collect();
    let mut fleece = Fleece::prepare(&qmp, &scratch_dir, &nodes, tag)?;
    let mut run = Run {
        qmp: &qmp,
        options,
        drives: &drives,
        fleece: &mut fleece,
        chain: &chain,
        new_bitmaps: Vec::new(),
        scratch_peak: 0,
        cancel,
    };
    let result = run.run(meta, &bases, tag, &mut progress);
    let new_bitmaps = std::mem::take(&mut run.new_bitmaps);
    let peak = run.scratch_peak.max(fleece.scratch_bytes());
    let warnings = fleece.teardown();
    match result {
        Ok((write, stats)) => Ok(CaptureSummary {
            drives: record.drives,
            write,
            clusters_stored: stats,
            scratch_peak: Some(peak),
            warnings,
            cleared,
        }),
        Err(e) => {
            // No archive holds the new checkpoints.
            for (node, name) in new_bitmaps {
                let _ = qmp.run(&BlockDirtyBitmapRemove::new(&node, &name));
            }
            Err(if cancel.load(Ordering::Relaxed) {
                CaptureError::Cancelled
            } else {
                e
            })
        }
    }
}

/// The part of a comparison that can fail half-way.
struct Run<'a, 'q> {
    qmp: &'q Qmp,
    options: &'a CaptureOptions,
    drives: &'a [Drive],
    fleece: &'a mut Fleece<'q>,
    /// The chain compared against (its leaves give the drive digests of
    /// the clusters that stay unchanged).
    chain: &'a Arc<Chain>,
    /// Checkpoints added by the transaction, removed on failure.
    new_bitmaps: Vec<(String, String)>,
    scratch_peak: u64,
    cancel: &'a AtomicBool,
}

impl Run<'_, '_> {
    fn run(
        &mut self,
        meta: ArchiveMeta,
        bases: &[Option<ChainDrive>],
        tag: &str,
        progress: &mut impl FnMut(JobProgress),
    ) -> Result<(WriteSummary, Vec<DriveStats>)> {
        let mut transaction = Transaction::new();
        for (i, d) in self.drives.iter().enumerate() {
            transaction.push(&checkpoint_bitmap(d));
            transaction.push(&self.fleece.start_action(i));
        }
        let (started, thawed) =
            session::run_frozen(self.qmp, self.options.fsfreeze.as_deref(), &transaction)?;
        started?;
        self.fleece.started();
        self.new_bitmaps = self
            .drives
            .iter()
            .map(|d| (d.node.clone(), d.bitmap.clone()))
            .collect();
        thawed?;
        self.fleece.open_views()?;
        let socket_dir = self
            .options
            .socket_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let own = socket_dir.join(format!("vma-view-{}-{tag}.sock", std::process::id()));
        let (socket, exports) =
            self.fleece
                .export_views(self.options.qemu_nbd_socket.as_deref(), &own, tag)?;

        let total: u64 = self.drives.iter().map(|d| d.size).sum();
        let out = vma_core::storage::create(
            &self.options.archive,
            self.options.force,
            Some(total + (64 << 20)),
        )?;
        let mut writer = Writer::new(out, meta, &self.options.writer)?;
        if writer.header().parent.is_some() {
            writer.set_leaf_source(self.chain.leaf_source());
        }
        let throttle = Throttle::new(self.options.speed);
        let mut done = 0;
        let mut stats = Vec::new();
        let mut sampled = Instant::now();
        for ((d, base), export) in self.drives.iter().zip(bases).zip(&exports) {
            let view = self.open_view(&socket, export, d)?;
            let view = Guarded {
                image: view,
                cancel: self.cancel,
                throttle: &throttle,
            };
            let fleece = &*self.fleece;
            let peak = &mut self.scratch_peak;
            let mut report = |n: u64| {
                progress(JobProgress {
                    done: done + n,
                    total,
                });
                if sampled.elapsed() > Duration::from_millis(200) {
                    sampled = Instant::now();
                    *peak = (*peak).max(fleece.scratch_bytes());
                }
            };
            let base = base.as_ref().map(|b| b as &dyn DiskImage);
            let compared = diff_or_copy(&mut writer, d.id, &view, base, &mut report)?;
            stats.push(match compared {
                Some(s) => DriveStats {
                    clusters: s.changed,
                    out_of_order: 0,
                    unchanged: s.unchanged,
                },
                None => DriveStats {
                    clusters: clusters_for(d.size),
                    out_of_order: 0,
                    unchanged: 0,
                },
            });
            view.image.disconnect();
            done += d.size;
        }
        let (out, summary) = writer.finish()?;
        out.finish()?;
        Ok((summary, stats))
    }

    /// Connect to drive `d`'s view.
    fn open_view(&self, socket: &Path, export: &str, d: &Drive) -> Result<NbdImage> {
        let client = NbdClient::connect_unix(socket, export)
            .map_err(|e| CaptureError::Invalid(format!("drive {}: {e}", d.name)))?;
        if client.size() != d.size {
            return Err(CaptureError::Invalid(format!(
                "drive {}: the view of node {} has {} bytes, the node {}",
                d.name,
                d.node,
                client.size(),
                d.size
            )));
        }
        Ok(NbdImage::new(client))
    }
}

/// Limits reads to a rate in bytes per second (0: no limit).
struct Throttle {
    speed: u64,
    state: Mutex<(Instant, u64)>,
}

impl Throttle {
    fn new(speed: u64) -> Throttle {
        Throttle {
            speed,
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Account for `bytes` about to be read, sleeping as long as needed.
    fn take(&self, bytes: u64) {
        if self.speed == 0 {
            return;
        }
        let wait = {
            let mut state = self.state.lock().expect("throttle lock");
            state.1 += bytes;
            let due = Duration::from_secs_f64(state.1 as f64 / self.speed as f64);
            due.saturating_sub(state.0.elapsed())
        };
        std::thread::sleep(wait);
    }
}

/// A view that stops reading once `cancel` is set and reads no faster
/// than its throttle allows.
struct Guarded<'a> {
    image: NbdImage,
    cancel: &'a AtomicBool,
    throttle: &'a Throttle,
}

impl Guarded<'_> {
    fn check(&self) -> vma_core::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(vma_core::Error::Invalid("cancelled".into()));
        }
        Ok(())
    }
}

impl DiskImage for Guarded<'_> {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn path(&self) -> &Path {
        self.image.path()
    }

    fn status(&self, offset: u64) -> vma_core::Result<Stretch> {
        self.check()?;
        self.image.status(offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vma_core::Result<()> {
        self.check()?;
        self.throttle.take(buf.len() as u64);
        self.check()?;
        self.image.read_at(buf, offset)
    }
}

//! `create` and `diff`: disk images written as the drives of a new
//! archive, through [`crate::ops::output::write_archive`].

use std::sync::Arc;

use crate::atomic::StaleTemporary;
use crate::chain::{Chain, ChainDrive};
use crate::error::Result;
use crate::image::source::{copy_image, DiskImage};
use crate::ops::convert::write_any_archive;
use crate::ops::diff::{diff_or_copy, DiffStats};
use crate::ops::output::{write_archive, ArchiveOutput};
use crate::types::{ClusterObserver, Observed};
use crate::util::ProgressFn;
use crate::write::writer::{ArchiveMeta, Writer, WriterOptions};

/// How [`create_archive`] and [`diff_archive`] write.
#[derive(Clone, Default)]
pub struct CreateOptions {
    /// Write Proxmox VMA v1 rather than the native format (not for
    /// [`diff_archive`]: VMA v1 has no incremental archives).
    pub vma1: bool,
    /// The native writer's options (compression, threads).
    pub writer: WriterOptions,
    /// Progress of the writer's steps.
    pub progress: Option<ProgressFn>,
}

/// Write `images` (in order, each whole) as the drives of `meta` into
/// `output`. `position` hears the logical bytes done, all drives
/// together; `observer` sees every cluster written. Returns the bytes
/// written.
pub fn create_archive(
    output: &ArchiveOutput<'_>,
    meta: ArchiveMeta,
    images: &[Box<dyn DiskImage>],
    options: &CreateOptions,
    on_stale: &mut dyn FnMut(&StaleTemporary),
    position: &dyn Fn(u64),
    observer: &mut dyn ClusterObserver,
) -> Result<u64> {
    let drives = meta.drives.clone();
    let ((), written) = write_any_archive(
        output,
        on_stale,
        meta,
        options.vma1,
        &options.writer,
        options.progress.clone(),
        |writer| {
            let mut base = 0;
            let mut observed = Observed {
                inner: writer,
                observer: &mut *observer,
            };
            for (d, image) in drives.iter().zip(images) {
                copy_image(&mut observed, d.id, image.as_ref(), &mut |done| {
                    position(base + done)
                })
                .map_err(|e| e.in_step(format!("archiving drive {}", d.name)))?;
                base += d.size;
            }
            Ok(())
        },
    )?;
    Ok(written)
}

/// Write `images` as the drives of `meta`, an incremental archive on top
/// of `chain`'s newest point in time, into `output`: each image is
/// compared with the same-named drive of the same size there and only the
/// clusters that differ are stored; a drive the parent lacks (or whose size
/// changed) is stored in full. `position` hears the logical bytes done.
/// Returns, per drive, the comparison's figures (None: stored in full),
/// and the bytes written.
pub fn diff_archive(
    output: &ArchiveOutput<'_>,
    chain: &Arc<Chain>,
    mut meta: ArchiveMeta,
    images: &[Box<dyn DiskImage>],
    options: &CreateOptions,
    on_stale: &mut dyn FnMut(&StaleTemporary),
    position: &dyn Fn(u64),
) -> Result<(Vec<Option<DiffStats>>, u64)> {
    chain.refuse_interrupted(|_| true)?;
    meta.parent = Some(chain.newest().identity()?);
    let mut bases = Vec::new();
    for d in &meta.drives {
        let base = chain
            .header()
            .drives
            .iter()
            .find(|b| b.name == d.name && b.size == d.size)
            .map(|b| ChainDrive::new(chain.clone(), b.id))
            .transpose()?;
        bases.push(base);
    }
    let drives = meta.drives.clone();
    write_archive(
        output,
        on_stale,
        |out| {
            let mut writer = Writer::new(out, meta, &options.writer)?;
            writer.set_progress(options.progress.clone());
            writer.set_leaf_source(chain.leaf_source());
            let mut stats = Vec::new();
            let mut done = 0;
            for ((d, image), base) in drives.iter().zip(images).zip(&bases) {
                let base = base.as_ref().map(|b| b as &dyn DiskImage);
                stats.push(diff_or_copy(
                    &mut writer,
                    d.id,
                    image.as_ref(),
                    base,
                    &mut |n| position(done + n),
                )?);
                done += d.size;
            }
            writer.finish()?;
            Ok(stats)
        },
        |_| Ok(()),
    )
}

//! Free-space preflight of restores from VMA v1 archives and streams.
//!
//! A v1 archive has no index: its header gives only the drive sizes, so
//! the data a restore may write is bounded by the selected drives' sizes,
//! or, for an uncompressed archive file, by the archive's own length when
//! that is smaller (v1 stores its blocks as they are). With an uncompressed
//! archive file, a restore whose target file system has less free space
//! than that bound is refused up front (`--no-space-check` skips the
//! check). A compressed file or a stream gives only the drive sizes, which
//! say nothing of a thin disk's data: exceeding them is a warning, not a
//! refusal, and a restore that does run out of space fails and removes
//! what it wrote. Native archive files carry each drive's data size in
//! their index: a full archive's drives are checked against it
//! ([`check_native_dir`]; `--to` targets in [`crate::targets`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Result};
use vma_core::read::detect::StreamCompression;
use vma_core::util::human_bytes;
use vma_core::Header;

/// The most data bytes a v1 restore of drives of `sizes` bytes writes,
/// given the archive's length when known.
pub(crate) fn v1_bound(sizes: u64, archive_len: Option<u64>) -> u64 {
    archive_len.map_or(sizes, |l| l.min(sizes))
}

/// The length of an uncompressed archive file (None for a stream or a
/// compressed file, whose length says nothing about the data).
pub(crate) fn archive_len(path: Option<&Path>, compression: StreamCompression) -> Option<u64> {
    match (path, compression) {
        (Some(p), StreamCompression::None) => Some(crate::s3::input_len(p)).filter(|l| *l > 0),
        _ => None,
    }
}

/// Free bytes (for unprivileged users) of the file system holding `path`,
/// or of its nearest existing parent.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    let mut p = Some(path);
    while let Some(d) = p {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        if d.exists() {
            let c = CString::new(d.as_os_str().as_bytes()).ok()?;
            // SAFETY: statvfs fills the struct we pass; `c` is NUL-terminated.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
                return None;
            }
            return Some(st.f_bavail as u64 * st.f_frsize as u64);
        }
        p = d.parent();
    }
    None
}

/// Refuse to extract the `selected` drives (empty: all) of the v1 archive
/// `header` into `dir` when its file system cannot hold their data bound.
pub(crate) fn check_v1_dir(
    dir: &Path,
    header: &Header,
    selected: &[String],
    archive_len: Option<u64>,
) -> Result<()> {
    let sizes: u64 = header
        .drives
        .iter()
        .filter(|d| selected.is_empty() || selected.contains(&d.name))
        .map(|d| d.size)
        .sum();
    let need = v1_bound(sizes, archive_len);
    let Some(free) = free_bytes(dir) else {
        return Ok(());
    };
    if need > free && archive_len.is_none() {
        eprintln!(
            "vma: warning: {} has {} free and the drives are {} in size; a VMA v1 stream records no data size, so a thin disk may still fit (a restore that runs out of space fails and removes what it wrote)",
            dir.display(),
            human_bytes(free),
            human_bytes(need),
        );
    } else if need > free {
        let why = if archive_len.is_some_and(|l| l < sizes) {
            "the archive's size: VMA v1 records no data size"
        } else {
            "the drives' size, below the archive's: VMA v1 records no data size"
        };
        bail!(
            "not enough free space in {}: the drives may need up to {} ({need} bytes; {why}), the file system has {} ({free} bytes) free; free some space, extract elsewhere, or pass --no-space-check if the drives are sparse enough to fit",
            dir.display(),
            human_bytes(need),
            human_bytes(free),
        );
    }
    Ok(())
}

/// Refuse to extract the `selected` drives (empty: all) of the full native
/// archive at `archive` into `dir` when its file system cannot hold the
/// data the index records for them (plus qcow2's tables when `qcow2`).
/// Incremental archives (their data is spread over the chain), compressed
/// qcow2 output and archives whose index cannot be read are not checked.
pub(crate) fn check_native_dir(
    dir: &Path,
    archive: &Path,
    selected: &[String],
    qcow2: bool,
) -> Result<()> {
    let Ok(reader) = vma_core::Reader::open(archive) else {
        return Ok(());
    };
    if reader.header().parent.is_some() {
        return Ok(());
    }
    let cluster = vma_core::format::CLUSTER_SIZE as u64;
    let need: u64 = reader
        .header()
        .drives
        .iter()
        .filter(|d| selected.is_empty() || selected.contains(&d.name))
        .filter_map(|d| {
            let data = (reader.record(d.id)?.data_clusters * cluster).min(d.size);
            // qcow2: one 8-byte L2 entry and a 2-byte refcount per cluster.
            Some(if qcow2 {
                data + data / cluster * 10 + (1 << 20)
            } else {
                data
            })
        })
        .sum();
    let Some(free) = free_bytes(dir) else {
        return Ok(());
    };
    if need > free {
        bail!(
            "not enough free space in {}: the drives hold {} of data ({need} bytes, from the archive's index), the file system has {} ({free} bytes) free; free some space, extract elsewhere, or pass --no-space-check",
            dir.display(),
            human_bytes(need),
            human_bytes(free),
        );
    }
    Ok(())
}

//! `s3://BUCKET/KEY` archives in the commands: global flags, reading an
//! object as a stream, writing one as a multipart upload, and what prune
//! needs (prefixes, locks, deletes). The store itself is `vma-s3`.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use vma_s3::write::{LockMode, Retention};
use vma_s3::Location;

/// Flags for archives in S3-compatible stores (every command).
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct S3Args {
    /// Endpoint of an S3-compatible store (default: `AWS_ENDPOINT_URL`,
    /// the profile's `endpoint_url`, else AWS).
    #[arg(long, global = true, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Object Lock: keep an uploaded archive undeletable until DATE
    /// (`2030-01-31` or RFC 3339), with `--lock-mode`.
    #[arg(long, global = true, value_name = "DATE")]
    retain_until: Option<String>,
    /// Object Lock mode for `--retain-until`.
    #[arg(long, global = true, value_parser = ["governance", "compliance"])]
    lock_mode: Option<String>,
}

static EXPECTED: AtomicU64 = AtomicU64::new(0);

/// Plug `s3://` locations in and take the flags.
pub(crate) fn install(args: &S3Args) -> Result<()> {
    if let Some(e) = &args.s3_endpoint {
        vma_s3::config::set_endpoint(e);
        // Inherited by the serving process of `vma mount`.
        std::env::set_var("AWS_ENDPOINT_URL", e);
    }
    let retention = match (&args.retain_until, &args.lock_mode) {
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            bail!("--retain-until and --lock-mode go together (governance or compliance)")
        }
        (Some(date), Some(mode)) => {
            let until = parse_date(date)?;
            if until <= chrono::Utc::now() {
                bail!("--retain-until {date} is in the past");
            }
            Some(Retention {
                mode: if mode == "compliance" {
                    LockMode::Compliance
                } else {
                    LockMode::Governance
                },
                until,
            })
        }
    };
    vma_s3::write::set_default_retention(retention);
    vma_s3::install();
    Ok(())
}

fn parse_date(s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| anyhow!("--retain-until takes YYYY-MM-DD or an RFC 3339 time, not {s:?}"))?;
    Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
}

/// True for an `s3://` argument.
pub(crate) fn is_s3(arg: &str) -> bool {
    vma_s3::is_s3(arg)
}

/// True for an `s3://` path.
pub(crate) fn is_s3_path(p: &Path) -> bool {
    p.to_str().is_some_and(is_s3)
}

/// An upper bound of the next archive's size, to size its upload's parts.
pub(crate) fn expect_size(bytes: u64) {
    EXPECTED.store(bytes, Ordering::Relaxed);
}

/// An object as one sequential stream (ranged GETs, read ahead).
pub(crate) fn open_input(archive: &str) -> Result<(Box<dyn Read + Send>, Option<PathBuf>)> {
    let loc = Location::parse(archive)?;
    let src = vma_s3::read::ObjectSource::open(&loc)?;
    let len = src.len();
    let src: vma_core::storage::Source = Arc::new(src);
    Ok((
        Box::new(vma_core::storage::SeqRead::new(src, 0, len)),
        Some(PathBuf::from(archive)),
    ))
}

/// Size of an input file or object, for progress (0 when unknown).
pub(crate) fn input_len(p: &Path) -> u64 {
    if is_s3_path(p) {
        return Location::from_path(p)
            .ok()
            .and_then(|l| vma_s3::size(&l).ok())
            .unwrap_or(0);
    }
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Write an archive to `archive` as a multipart upload, visible only when
/// `body` succeeded and the upload is complete; aborted otherwise.
pub(crate) fn write_archive<T>(
    archive: &str,
    force: bool,
    body: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<(T, u64)> {
    Location::parse(archive)?;
    let expected = EXPECTED.load(Ordering::Relaxed);
    let sink = vma_core::storage::create(
        Path::new(archive),
        force,
        (expected > 0).then_some(expected),
    )?;
    let mut out = crate::Counting(BufWriter::with_capacity(1 << 20, sink), 0);
    let result = body(&mut out)?;
    let written = out.1;
    let sink = out
        .0
        .into_inner()
        .map_err(|e| anyhow!("uploading {archive}: {}", e.error()))?;
    sink.finish()
        .with_context(|| format!("uploading {archive}"))?;
    Ok((result, written))
}

/// Abort every upload under way (on a signal); the objects concerned.
pub(crate) fn abort_uploads() -> Vec<String> {
    vma_s3::write::abort_all()
}

/// True when `p` names a prefix (no object of that name).
pub(crate) fn is_prefix(p: &Path) -> bool {
    is_s3_path(p)
        && Location::from_path(p)
            .map(|l| l.key.is_empty() || !vma_s3::exists(&l).unwrap_or(false))
            .unwrap_or(false)
}

/// True when `p` names an existing object.
pub(crate) fn is_object(p: &Path) -> bool {
    Location::from_path(p)
        .ok()
        .is_some_and(|l| !l.key.is_empty() && vma_s3::exists(&l).unwrap_or(false))
}

/// Why an object may not be deleted (Object Lock), if so.
pub(crate) fn locked(p: &Path) -> Result<Option<String>> {
    let loc = Location::from_path(p)?;
    Ok(vma_s3::locked(&loc)?)
}

/// Delete an object.
pub(crate) fn delete(p: &Path) -> Result<()> {
    let loc = Location::from_path(p)?;
    Ok(vma_s3::delete(&loc)?)
}

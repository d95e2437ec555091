//! Archive outputs that appear complete or not at all.
//!
//! [`write_archive`] is the one way `create`, `convert`, `diff`, `merge`
//! and prune's synthetic fulls write an archive:
//!
//! - `-` is standard output (a pipe: nothing can be taken back there);
//! - a location a plugged-in store handles (such as `s3://BUCKET/KEY`, see
//!   [`crate::storage`]) is written as one upload, visible only once the
//!   body succeeded and the upload is complete, aborted otherwise;
//! - a local path is written under a hidden temporary name beside it
//!   ([`AtomicFile`]), checked by the caller's `check` once complete, and
//!   only then renamed into place, never over an existing name unless
//!   `replace` (checked before anything is written, and again atomically by
//!   the rename). Temporaries that processes which are gone left in the
//!   directory are removed first.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use crate::atomic::{remove_stale_temporaries, AtomicFile, StaleTemporary};
use crate::error::{Error, Result};
use crate::read::stream::ArchiveStream;
use crate::storage;
use crate::util::Counting;

/// Buffer between the archive writer and the output.
const BUFFER: usize = 1 << 20;

/// Where an archive goes.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveOutput<'a> {
    /// `-` (standard output), a store's location, or a local path.
    pub location: &'a str,
    /// Replace an existing file or object (`--force`).
    pub replace: bool,
    /// An upper bound of the archive's size (0: unknown), to size an
    /// upload's parts.
    pub expected_size: u64,
}

impl<'a> ArchiveOutput<'a> {
    /// `location`, replaced only if `replace`, size unknown.
    pub fn new(location: &'a str, replace: bool) -> ArchiveOutput<'a> {
        ArchiveOutput {
            location,
            replace,
            expected_size: 0,
        }
    }

    /// The same output with an upper bound of the archive's size.
    pub fn expecting(self, expected_size: u64) -> ArchiveOutput<'a> {
        ArchiveOutput {
            expected_size,
            ..self
        }
    }

    /// True for standard output.
    pub fn is_stdout(&self) -> bool {
        self.location == "-"
    }
}

/// Write an archive to `output` through `body` (see the module): returns
/// the body's result and the bytes written. `check` sees a local file,
/// complete and flushed, before it is renamed into place (an upload is
/// checked by the store part by part instead, and standard output cannot
/// be); when it fails, nothing appears. `on_stale` hears of every
/// temporary left by a process that is gone and removed beside a local
/// output.
pub fn write_archive<T, E: From<Error>>(
    output: &ArchiveOutput<'_>,
    on_stale: &mut dyn FnMut(&StaleTemporary),
    body: impl FnOnce(&mut dyn Write) -> std::result::Result<T, E>,
    check: impl FnOnce(&File) -> std::result::Result<(), E>,
) -> std::result::Result<(T, u64), E> {
    let location = output.location;
    if output.is_stdout() {
        let mut out = Counting::new(BufWriter::with_capacity(BUFFER, std::io::stdout().lock()));
        let result = body(&mut out)?;
        out.flush()
            .map_err(|e| Error::io("writing standard output", e))?;
        return Ok((result, out.count()));
    }
    let path = Path::new(location);
    if let Some(remote) = storage::remote_for(path) {
        let expected = (output.expected_size > 0).then_some(output.expected_size);
        let sink = remote.create(path, output.replace, expected)?;
        let mut out = Counting::new(BufWriter::with_capacity(BUFFER, sink));
        let result = body(&mut out)?;
        let written = out.count();
        let sink = out
            .into_inner()
            .into_inner()
            .map_err(|e| Error::io(format!("uploading {location}"), e.into_error()))?;
        sink.finish()?;
        return Ok((result, written));
    }
    if storage::is_remote(path) {
        return Err(Error::UnsupportedFormat {
            format: format!("the location {location}"),
            hint: "this program was built without support for its scheme".into(),
        }
        .into());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    for stale in remove_stale_temporaries(dir)? {
        on_stale(&stale);
    }
    // Checked again, atomically, when the file is renamed into place.
    if path.symlink_metadata().is_ok() && !output.replace {
        return Err(Error::Exists {
            path: location.to_string(),
        }
        .into());
    }
    let file = AtomicFile::create(path)?.replacing(output.replace);
    let mut out = Counting::new(BufWriter::with_capacity(BUFFER, file));
    let result = body(&mut out)?;
    let written = out.count();
    let file = out
        .into_inner()
        .into_inner()
        .map_err(|e| Error::io(format!("writing {location}"), e.into_error()))?;
    check(file.file())?;
    file.commit()?;
    Ok((result, written))
}

/// Check an archive file just written, from its start: every extent's
/// SHA-256, the structure, index, footer and archive digest
/// ([`crate::ops::verify::verify`]). `what` names it in the error.
pub fn verify_written(file: &File, threads: usize, what: &str) -> Result<()> {
    let mut f = file
        .try_clone()
        .map_err(|e| Error::io("reopening the new archive", e))?;
    let len = f
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io("reading the new archive", e))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io("reading the new archive", e))?;
    let stream = ArchiveStream::open(std::io::Read::take(f, len), "the new archive")?;
    let report = crate::ops::verify::verify(stream, threads, false, None)?;
    match report.problems.first() {
        None => Ok(()),
        Some(p) => Err(Error::NotVerified {
            what: what.to_string(),
            problem: p.to_string(),
        }),
    }
}

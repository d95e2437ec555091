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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(out: &ArchiveOutput<'_>, fail_check: bool) -> Result<((), u64)> {
        write_archive(
            out,
            &mut |_| {},
            |w: &mut dyn Write| w.write_all(b"new bytes").map_err(|e| Error::io("test", e)),
            |f: &File| {
                assert_eq!(f.metadata().unwrap().len(), 9, "check sees the whole file");
                if fail_check {
                    Err(Error::Invalid("refused by the check".into()))
                } else {
                    Ok(())
                }
            },
        )
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_local_output_appears_only_when_checked_and_never_replaces_unasked() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("a.vma");
        let loc = dest.to_str().unwrap();
        // A failed check leaves nothing, not even a temporary.
        let e = write(&ArchiveOutput::new(loc, false), true).unwrap_err();
        assert!(e.to_string().contains("refused by the check"), "{e}");
        assert!(names(t.path()).is_empty(), "{:?}", names(t.path()));
        // Written and counted.
        let ((), n) = write(&ArchiveOutput::new(loc, false), false).unwrap();
        assert_eq!(n, 9);
        assert_eq!(std::fs::read(&dest).unwrap(), b"new bytes");
        // An existing name is refused without `replace`, kept as it is.
        std::fs::write(&dest, b"old").unwrap();
        let e = write(&ArchiveOutput::new(loc, false), false).unwrap_err();
        assert!(matches!(e, Error::Exists { .. }), "{e}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        // With `replace`, a failed check keeps the old file too.
        write(&ArchiveOutput::new(loc, true), true).unwrap_err();
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        write(&ArchiveOutput::new(loc, true), false).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new bytes");
        assert_eq!(names(t.path()), ["a.vma"]);
    }

    #[test]
    fn a_location_of_a_store_that_is_not_plugged_in_is_refused() {
        let e = write(&ArchiveOutput::new("nostore://bucket/key", false), false).unwrap_err();
        assert!(matches!(e, Error::UnsupportedFormat { .. }), "{e}");
    }

    #[test]
    fn verify_written_refuses_an_archive_with_a_damaged_extent() {
        use crate::format::{DriveInfo, CLUSTER_SIZE};
        use crate::types::{ClusterNo, DriveId};
        use crate::write::writer::{ArchiveMeta, Writer, WriterOptions};
        let meta = ArchiveMeta::new(
            vec![DriveInfo {
                id: DriveId(1),
                name: "d".into(),
                size: CLUSTER_SIZE as u64,
            }],
            Vec::new(),
        );
        let options = WriterOptions {
            compression: crate::Compression::None,
            ..Default::default()
        };
        let mut w = Writer::new(Vec::new(), meta, &options).unwrap();
        w.write_cluster(DriveId(1), ClusterNo(0), &[7u8; CLUSTER_SIZE])
            .unwrap();
        let mut bytes = w.finish().unwrap().0;
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("x.vma");
        std::fs::write(&path, &bytes).unwrap();
        verify_written(&File::open(&path).unwrap(), 1, "the test archive").unwrap();
        // One byte of the stored cluster changed: its extent's digest fails.
        let at = bytes.windows(64).position(|w| w == [7u8; 64]).unwrap() + 100;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = verify_written(&File::open(&path).unwrap(), 1, "the test archive").unwrap_err();
        assert!(matches!(e, Error::NotVerified { .. }), "{e}");
        assert!(e.is_damage(), "{e}");
        assert!(
            e.to_string().starts_with("checking the test archive: "),
            "{e}"
        );
    }
}

//! The storage seam: where archive bytes come from and go to.
//!
//! A [`ReadAt`] is a random-access read source (a local file, or an object
//! in a store read with ranged requests); a [`Sink`] is a sequential sink
//! that makes its bytes visible only when finished (a temporary file
//! renamed into place, or a multipart upload completed). Local files are
//! built in; a store is plugged in at run time with [`set_remote`] and is
//! then used for every location that it [`Remote::handles`] (for example
//! `s3://BUCKET/KEY`), so the readers, chains and prune work on such
//! locations unchanged. This crate itself never talks to a network.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, IoContext, Result};

/// A random-access read source of known length.
pub trait ReadAt: Send + Sync {
    /// Total length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fill `buf` from `offset`; an error if the source ends first.
    fn read_range(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Up to `buf.len()` bytes from `offset` (fewer only at the end).
    fn read_some(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.size()?;
        let n = (len.saturating_sub(offset)).min(buf.len() as u64) as usize;
        self.read_range(&mut buf[..n], offset)?;
        Ok(n)
    }
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_range(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn read_some(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// A shared read source.
pub type Source = Arc<dyn ReadAt>;

/// A sequential `Read` over `src` from `start` to `end`.
pub struct SeqRead {
    src: Source,
    pos: u64,
    end: u64,
}

impl SeqRead {
    /// Bytes `start..end` of `src`, in order.
    pub fn new(src: Source, start: u64, end: u64) -> SeqRead {
        SeqRead {
            src,
            pos: start,
            end,
        }
    }
}

impl Read for SeqRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.end.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let n = self.src.read_some(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A sequential sink whose bytes become visible under their name only when
/// [`Sink::finish`] succeeds; dropping it unfinished, or [`Sink::abort`],
/// leaves nothing.
pub trait Sink: Write + Send {
    /// Make everything written visible under the sink's name.
    fn finish(self: Box<Self>) -> Result<()>;
    /// Discard everything written.
    fn abort(self: Box<Self>);
    /// Make the bytes visible under `dest` instead when finished, replacing
    /// what is there (a capture keeping what it copied for a retry). Only
    /// local files can; an upload's name is fixed when it starts.
    fn retarget(&mut self, dest: &Path) -> Result<()> {
        Err(Error::Invalid(format!(
            "cannot keep the output under {}: its name was fixed when it started",
            dest.display()
        )))
    }
}

impl Sink for crate::atomic::AtomicFile {
    fn finish(self: Box<Self>) -> Result<()> {
        self.commit()
    }
    fn abort(self: Box<Self>) {
        // Dropping an uncommitted file removes it.
    }
    fn retarget(&mut self, dest: &Path) -> Result<()> {
        self.set_dest(dest.to_path_buf());
        self.set_replacing(true);
        Ok(())
    }
}

/// A store reached through locations it recognises (such as `s3://...`).
pub trait Remote: Send + Sync {
    /// True when `location` names an object of this store.
    fn handles(&self, location: &Path) -> bool;
    /// Open an object for random access.
    fn open(&self, location: &Path) -> Result<Source>;
    /// The objects directly under `prefix` (a location ending before a `/`).
    fn list(&self, prefix: &Path) -> Result<Vec<PathBuf>>;
    /// Delete an object.
    fn delete(&self, location: &Path) -> Result<()>;
    /// Why `location` may not be deleted now (a retention date), if so.
    fn delete_blocked(&self, location: &Path) -> Result<Option<String>>;
    /// Start writing an object at `location`, visible only once the sink
    /// is finished: refused with [`Error::Exists`] if it exists, unless
    /// `replace`. `expected_size` is an upper bound of its size, if known.
    fn create(
        &self,
        location: &Path,
        replace: bool,
        expected_size: Option<u64>,
    ) -> Result<Box<dyn Sink>> {
        let _ = (replace, expected_size);
        Err(Error::UnsupportedFormat {
            format: format!("writing {}", location.display()),
            hint: "this store is read-only here".into(),
        })
    }
}

static REMOTE: OnceLock<Box<dyn Remote>> = OnceLock::new();

/// Plug in a store; later calls are ignored.
pub fn set_remote(remote: Box<dyn Remote>) {
    let _ = REMOTE.set(remote);
}

/// The store that handles `location`, if one is plugged in and does.
pub fn remote_for(location: &Path) -> Option<&'static dyn Remote> {
    REMOTE.get().map(|r| &**r).filter(|r| r.handles(location))
}

/// True when `location` is an object location (`scheme://...`), plugged in or not.
pub fn is_remote(location: &Path) -> bool {
    location.to_str().is_some_and(|s| s.contains("://"))
}

/// Open `location` for random access: an object of the plugged-in store,
/// else a local file.
pub fn open(location: &Path) -> Result<Source> {
    if let Some(r) = remote_for(location) {
        return r.open(location);
    }
    if is_remote(location) {
        return Err(Error::UnsupportedFormat {
            format: format!("the location {}", location.display()),
            hint: "this program was built without support for its scheme".into(),
        });
    }
    let file = File::open(location).ctx(|| format!("opening {}", location.display()))?;
    Ok(Arc::new(file))
}

/// Delete `location`: an object of the plugged-in store, else a local file.
pub fn delete(location: &Path) -> Result<()> {
    if let Some(r) = remote_for(location) {
        return r.delete(location);
    }
    std::fs::remove_file(location).ctx(|| format!("deleting {}", location.display()))
}

/// Why `location` may not be deleted now (an object's retention), if so;
/// local files never say so.
pub fn delete_blocked(location: &Path) -> Result<Option<String>> {
    match remote_for(location) {
        Some(r) => r.delete_blocked(location),
        None => Ok(None),
    }
}

/// Start writing `location`: an object of the plugged-in store (a
/// multipart upload), else a local file under a temporary name (see
/// [`crate::atomic`]). Nothing appears under the name until the sink is
/// finished; an existing one is replaced only with `force`.
/// `expected_size` (an upper bound, when known) sizes an upload's parts.
pub fn create(location: &Path, force: bool, expected_size: Option<u64>) -> Result<Box<dyn Sink>> {
    if let Some(r) = remote_for(location) {
        return r.create(location, force, expected_size);
    }
    if is_remote(location) {
        return Err(Error::UnsupportedFormat {
            format: format!("the location {}", location.display()),
            hint: "this program was built without support for its scheme".into(),
        });
    }
    Ok(Box::new(
        crate::atomic::AtomicFile::create(location)?.replacing(force),
    ))
}

/// The entries of a directory or object prefix (files only, sorted), or
/// nothing when it cannot be read.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    if let Some(r) = remote_for(dir) {
        let mut v = r.list(dir).unwrap_or_default();
        v.sort();
        return v;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

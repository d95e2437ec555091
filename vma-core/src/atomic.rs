//! Output files that appear under their names complete or not at all.
//!
//! Every file is written under a hidden temporary name beside its
//! destination (`.NAME.partial-PID`), synced, and only then renamed into
//! place ([`AtomicFile::commit`], or [`commit_all`] for several files as
//! one):
//!
//! - An existing name is replaced only when the file was made
//!   [`AtomicFile::replacing`]. Otherwise the rename is
//!   `renameat2(RENAME_NOREPLACE)` (where the file system lacks it,
//!   `link()` + `unlink()`, or without hard links the name claimed with
//!   `O_EXCL` first), so a name another process creates while this
//!   one writes is never replaced either: the commit fails with
//!   [`Error::Exists`].
//! - [`commit_all`] commits all files or none: if one step fails, what this
//!   call already committed is undone (new files removed, replaced files
//!   put back).
//! - Temporaries are registered process-wide while they exist, so that a
//!   thread handling SIGINT, SIGTERM or SIGHUP can remove them
//!   ([`remove_temporaries`]); commits hold the same lock, so a signal
//!   takes effect before or after a commit step, never in the middle.
//! - Each temporary is held with an exclusive `flock` while its process
//!   lives, so [`remove_stale_temporaries`] can tell and remove what a
//!   process that is gone (SIGKILL, power loss) left behind.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, IoContext, Result};

/// Start write-back of dirty pages after this many bytes were written, so
/// the final fsync finds little left and disk writes overlap the work.
const WRITE_BEHIND_BYTES: u64 = 64 << 20;

/// The middle of a temporary's name: `.NAME.partial-PID`.
const TEMP_MARK: &str = ".partial-";
/// The middle of the name under which [`commit_all`] keeps a replaced file
/// until every file is committed, where the file system cannot exchange
/// two names atomically: `.NAME.replaced-PID`.
const OLD_MARK: &str = ".replaced-";

/// The temporaries of this process, and whether they were removed for an
/// exit (after which nothing new is created or committed).
struct Registry {
    paths: Vec<PathBuf>,
    closed: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    paths: Vec::new(),
    closed: false,
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn interrupted() -> Error {
    Error::Invalid("interrupted: temporary files were removed for exit".into())
}

/// Remove every temporary file this process has open or is committing,
/// and refuse to create or commit any from now on: for a signal handler
/// thread about to exit. Returns the paths removed. Blocks while a commit
/// step is under way, so that it completes first.
pub fn remove_temporaries() -> Vec<PathBuf> {
    let mut reg = registry();
    reg.closed = true;
    let mut removed = Vec::new();
    for p in std::mem::take(&mut reg.paths) {
        if std::fs::remove_file(&p).is_ok() {
            removed.push(p);
        }
    }
    removed
}

/// The hidden sibling `.NAME{mark}PID` of `dest`, the name cut so it stays
/// a valid file name.
fn sibling(dest: &Path, mark: &str) -> Result<PathBuf> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} has no file name", dest.display())))?
        .to_string_lossy();
    let suffix = format!("{mark}{}", std::process::id());
    let mut keep = name.len().min(255 - 1 - suffix.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    Ok(dir.join(format!(".{}{suffix}", &name[..keep])))
}

/// A file being written under a temporary name in its final directory.
pub struct AtomicFile {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    replace: bool,
    done: bool,
    unsynced: AtomicU64,
    /// Device and inode of the file, to recognise it under its final name.
    id: (u64, u64),
}

impl AtomicFile {
    /// Create a new temporary file beside `dest` (`.NAME.partial-PID`).
    /// It is created exclusively: whatever already sits under that name, a
    /// planted symlink included, is never opened or followed. The commit
    /// will not replace an existing `dest` (see [`AtomicFile::replacing`]).
    pub fn create(dest: &Path) -> Result<AtomicFile> {
        let tmp = sibling(dest, TEMP_MARK)?;
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&tmp)
        };
        let mut reg = registry();
        if reg.closed {
            return Err(interrupted());
        }
        let file = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A leftover of an earlier run with our pid: remove the
                // entry itself (never what a symlink points to) and retry.
                let _ = std::fs::remove_file(&tmp);
                open()
            }
            other => other,
        }
        .ctx(|| format!("creating {}", tmp.display()))?;
        reg.paths.push(tmp.clone());
        drop(reg);
        // SAFETY: flock on a descriptor we own. Where the file system has
        // no locks, stale temporaries are told by their pid alone.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let meta = file.metadata();
        let id = meta.map(|m| (m.dev(), m.ino())).unwrap_or_default();
        Ok(AtomicFile {
            file,
            tmp,
            dest: dest.to_path_buf(),
            replace: false,
            done: false,
            unsynced: AtomicU64::new(0),
            id,
        })
    }

    /// Whether the commit may replace an existing file under the final
    /// name (`--force`); by default it fails with [`Error::Exists`].
    pub fn replacing(mut self, replace: bool) -> AtomicFile {
        self.replace = replace;
        self
    }

    /// [`AtomicFile::replacing`] in place.
    pub fn set_replacing(&mut self, replace: bool) {
        self.replace = replace;
    }

    /// The destination and the temporary, for messages.
    fn what(&self) -> String {
        format!(
            "{} (being written as {})",
            self.dest.display(),
            self.tmp.display()
        )
    }

    /// Write `bytes` at `offset` (for out-of-order output).
    pub fn write_all_at(&self, bytes: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(bytes, offset)
            .ctx(|| format!("writing {} at offset {offset}", self.what()))?;
        self.wrote(bytes.len());
        Ok(())
    }

    /// Set the file's length.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .ctx(|| format!("sizing {} to {len} bytes", self.what()))
    }

    /// Count written bytes; every 64 MiB ask the kernel to start writing
    /// the dirty pages back without waiting for them.
    fn wrote(&self, n: usize) {
        let total = self.unsynced.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total >= WRITE_BEHIND_BYTES {
            self.unsynced.store(0, Ordering::Relaxed);
            // SAFETY: sync_file_range only reads the descriptor we own.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Commit under `dest` instead (in the same directory as the first
    /// name, so the rename stays within one file system).
    pub fn set_dest(&mut self, dest: PathBuf) {
        self.dest = dest;
    }

    /// fsync, rename to the final name (see [`AtomicFile::replacing`]),
    /// fsync the directory.
    pub fn commit(self) -> Result<()> {
        commit_all(vec![self])
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .ctx(|| format!("syncing {}", self.what()))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.file.write(buf) {
            Ok(n) => {
                self.wrote(n);
                Ok(n)
            }
            // Name the file: the caller may know only an offset.
            Err(e) if e.kind() != std::io::ErrorKind::Interrupted => Err(std::io::Error::new(
                e.kind(),
                format!("writing {}: {e}", self.what()),
            )),
            Err(e) => Err(e),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let mut reg = registry();
            let _ = std::fs::remove_file(&self.tmp);
            reg.paths.retain(|p| p != &self.tmp);
        }
    }
}

/// Why renameat2 with flags is not there: the kernel or file system lacks it.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::ENOTSUP)
    )
}

fn cpath(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"))
}

#[cfg(test)]
thread_local! {
    /// Tests of the fallbacks: behave as a file system without renameat2 flags.
    static NO_RENAMEAT2: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    #[cfg(test)]
    if NO_RENAMEAT2.get() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Rename `from` to `to` unless `to` exists (then `AlreadyExists`), also
/// when another process creates `to` meanwhile.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Err(e) if unsupported(&e) => {}
        other => return other,
    }
    // link() fails on an existing name, atomically.
    match std::fs::hard_link(from, to) {
        Ok(()) => return std::fs::remove_file(from),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e),
        Err(_) => {}
    }
    // No hard links either (e.g. vfat): claim the name exclusively, then
    // rename over what we own.
    OpenOptions::new().write(true).create_new(true).open(to)?;
    std::fs::rename(from, to).inspect_err(|_| {
        let _ = std::fs::remove_file(to);
    })
}

/// What one commit step did, to undo it.
struct Placed {
    dest: PathBuf,
    id: (u64, u64),
    /// Where the file that was replaced now is (put back on undo, removed
    /// on success).
    old: Option<PathBuf>,
}

fn same_file(path: &Path, id: (u64, u64)) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

/// Move `f` under its final name. `keep_old`: keep a replaced file aside
/// (for undo) rather than letting the rename drop it.
fn place(f: &AtomicFile, keep_old: bool, reg: &mut Registry) -> Result<Placed> {
    let placed = |old| Placed {
        dest: f.dest.clone(),
        id: f.id,
        old,
    };
    let fail = |e: std::io::Error| {
        Error::io(
            format!("renaming {} to {}", f.tmp.display(), f.dest.display()),
            e,
        )
    };
    if f.replace && !keep_old {
        std::fs::rename(&f.tmp, &f.dest).map_err(fail)?;
        return Ok(placed(None));
    }
    // A name that keeps appearing and vanishing is given up on.
    for _ in 0..16 {
        let existing = std::fs::symlink_metadata(&f.dest);
        if existing.as_ref().is_ok_and(|m| m.is_dir()) {
            // rename(2) would refuse it, but an exchange would move it.
            return Err(fail(std::io::Error::from_raw_os_error(libc::EISDIR)));
        }
        let exists = existing.is_ok();
        if !exists || !f.replace {
            return match rename_noreplace(&f.tmp, &f.dest) {
                Ok(()) => Ok(placed(None)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && f.replace => continue,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Exists {
                    path: f.dest.display().to_string(),
                }),
                Err(e) => Err(fail(e)),
            };
        }
        // Swap: the old file moves to our temporary name.
        match renameat2(&f.tmp, &f.dest, libc::RENAME_EXCHANGE) {
            Ok(()) => return Ok(placed(Some(f.tmp.clone()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(fail(e)),
        }
        // No exchange: keep the old file under a second name first.
        let old = sibling(&f.dest, OLD_MARK)?;
        let _ = std::fs::remove_file(&old);
        reg.paths.push(old.clone());
        let kept = std::fs::hard_link(&f.dest, &old).or_else(|_| std::fs::rename(&f.dest, &old));
        if let Err(e) = kept {
            return Err(Error::io(
                format!(
                    "keeping {} aside as {} while it is replaced",
                    f.dest.display(),
                    old.display()
                ),
                e,
            ));
        }
        return match std::fs::rename(&f.tmp, &f.dest) {
            Ok(()) => Ok(placed(Some(old))),
            Err(e) => {
                if std::fs::symlink_metadata(&f.dest).is_err() {
                    let _ = std::fs::rename(&old, &f.dest);
                }
                Err(fail(e))
            }
        };
    }
    Err(fail(std::io::Error::other(
        "the name keeps being created and removed by another process",
    )))
}

/// Undo `placed` (newest first); returns what could not be undone.
fn undo(placed: &[Placed]) -> Vec<String> {
    let mut failed = Vec::new();
    for p in placed.iter().rev() {
        let result = match &p.old {
            Some(old) => std::fs::rename(old, &p.dest),
            None if same_file(&p.dest, p.id) => std::fs::remove_file(&p.dest),
            None => Ok(()),
        };
        if let Err(e) = result {
            failed.push(format!("{}: {e}", p.dest.display()));
        }
    }
    failed
}

/// Commit `files` as one: each is synced, then all are renamed into place
/// (each as [`AtomicFile::commit`] would), then their directories synced.
/// If any step fails, the files this call already committed are undone:
/// those that were new are removed, those that replaced a file give way
/// to it again, so the names hold what they held before. Signals wait
/// until the renames are done (see [`remove_temporaries`]).
pub fn commit_all(mut files: Vec<AtomicFile>) -> Result<()> {
    for f in &files {
        f.sync()?;
    }
    let keep_old = files.len() > 1;
    let mut reg = registry();
    if reg.closed {
        return Err(interrupted());
    }
    let mut placed = Vec::with_capacity(files.len());
    for f in &files {
        match place(f, keep_old, &mut reg) {
            Ok(p) => placed.push(p),
            Err(e) => {
                let failed = undo(&placed);
                drop(reg);
                return Err(if placed.is_empty() {
                    e
                } else if failed.is_empty() {
                    Error::Invalid(format!(
                        "{e}; the {} file(s) already committed were undone: {}",
                        placed.len(),
                        describe(&placed)
                    ))
                } else {
                    Error::Invalid(format!(
                        "{e}; undoing the files already committed failed for {}",
                        failed.join(", ")
                    ))
                });
            }
        }
    }
    for p in &placed {
        if let Some(old) = &p.old {
            let _ = std::fs::remove_file(old);
            reg.paths.retain(|q| q != old);
        }
    }
    for f in &mut files {
        f.done = true;
        reg.paths.retain(|q| q != &f.tmp);
    }
    drop(reg);
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| match f.dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn describe(placed: &[Placed]) -> String {
    placed
        .iter()
        .map(|p| p.dest.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A temporary file a process that is gone left behind, removed by
/// [`remove_stale_temporaries`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleTemporary {
    /// Where it was.
    pub path: PathBuf,
    /// The process that wrote it.
    pub pid: u32,
    /// Its size in bytes.
    pub size: u64,
}

/// The pid in a name of our temporaries (`.NAME.partial-PID`, or
/// `.NAME.replaced-PID`), if it is one.
pub fn temporary_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    [TEMP_MARK, OLD_MARK].iter().find_map(|mark| {
        let (stem, pid) = rest.rsplit_once(mark)?;
        if stem.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        pid.parse().ok()
    })
}

/// Whether process `pid` is gone (on this machine).
fn process_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Remove the temporaries in `dir` that processes which are gone left
/// behind (killed with SIGKILL, or a machine that went down): regular
/// files owned by this user, named as [`AtomicFile`] names them, whose
/// process is not running and which no process holds locked (a writer
/// keeps an `flock` on its temporary, which also covers writers on
/// another machine sharing the directory). Never follows symlinks.
/// Returns what was removed.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<StaleTemporary>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let me = std::process::id();
    // SAFETY: geteuid has no failure modes.
    let uid = unsafe { libc::geteuid() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = temporary_pid(&name.to_string_lossy()) else {
            continue;
        };
        if pid == me || !process_gone(pid) {
            continue;
        }
        let path = entry.path();
        // O_NOFOLLOW: a symlink is never ours; O_NONBLOCK: a FIFO cannot
        // block the open.
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if !meta.file_type().is_file() || meta.uid() != uid {
            continue;
        }
        // SAFETY: flock on a descriptor we own.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
        {
            continue;
        }
        if !same_file(&path, (meta.dev(), meta.ino())) {
            continue;
        }
        std::fs::remove_file(&path)
            .ctx(|| format!("removing the stale temporary file {}", path.display()))?;
        removed.push(StaleTemporary {
            path,
            pid,
            size: meta.len(),
        });
    }
    removed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(dest: &Path, bytes: &[u8]) -> AtomicFile {
        let mut f = AtomicFile::create(dest).unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn temporary_names_are_recognised() {
        assert_eq!(temporary_pid(".a.vma.partial-123"), Some(123));
        assert_eq!(temporary_pid(".a.replaced-7"), Some(7));
        assert_eq!(temporary_pid("a.vma.partial-123"), None);
        assert_eq!(temporary_pid(".partial-123"), None);
        assert_eq!(temporary_pid(".a.partial-12x"), None);
        assert_eq!(temporary_pid(".a.partial-"), None);
        assert_eq!(temporary_pid(".a.vma.partial"), None);
    }

    #[test]
    fn an_existing_name_is_replaced_only_when_asked() {
        existing_names_are_replaced_only_when_asked();
    }

    #[test]
    fn without_renameat2_flags_commits_still_never_replace_unasked() {
        NO_RENAMEAT2.set(true);
        existing_names_are_replaced_only_when_asked();
        commit_all_is_all_or_nothing_here();
    }

    fn existing_names_are_replaced_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::write(&dest, b"old").unwrap();
        let err = written(&dest, b"new").commit().unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        written(&dest, b"new").replacing(true).commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporaries left: {names:?}");
    }

    /// A name that appears after the file was created (another process
    /// racing to the same output) is not replaced.
    #[test]
    fn a_name_created_meanwhile_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let f = written(&dest, b"mine");
        std::fs::write(&dest, b"theirs").unwrap();
        assert!(matches!(f.commit(), Err(Error::Exists { .. })));
        assert_eq!(std::fs::read(&dest).unwrap(), b"theirs");
    }

    #[test]
    fn commit_all_is_all_or_nothing() {
        commit_all_is_all_or_nothing_here();
    }

    fn commit_all_is_all_or_nothing_here() {
        let dir = tempfile::tempdir().unwrap();
        let at = |n: &str| dir.path().join(n);
        // Without replacing: the third name exists, the first two go again.
        std::fs::write(at("c"), b"old c").unwrap();
        let files = vec![
            written(&at("a"), b"a"),
            written(&at("b"), b"b"),
            written(&at("c"), b"c"),
        ];
        let err = commit_all(files).unwrap_err().to_string();
        assert!(err.contains("exists") && err.contains("undone"), "{err}");
        assert!(!at("a").exists() && !at("b").exists());
        assert_eq!(std::fs::read(at("c")).unwrap(), b"old c");
        // Replacing: the old files come back when a later one fails.
        std::fs::write(at("a"), b"old a").unwrap();
        std::fs::create_dir(at("s")).unwrap();
        let files = vec![
            written(&at("a"), b"new a").replacing(true),
            written(&at("b"), b"new b").replacing(true),
            written(&at("c"), b"new c").replacing(true),
            written(&at("s").join("e"), b"new e").replacing(true),
        ];
        // The last one's temporary vanishes with its directory.
        std::fs::remove_dir_all(at("s")).unwrap();
        assert!(commit_all(files).is_err());
        // A directory is never replaced by a file (an exchange could).
        std::fs::create_dir(at("d")).unwrap();
        let files = vec![
            written(&at("a"), b"new a").replacing(true),
            written(&at("d"), b"new d").replacing(true),
        ];
        assert!(commit_all(files).is_err());
        assert!(at("d").is_dir());
        std::fs::remove_dir(at("d")).unwrap();
        assert_eq!(std::fs::read(at("a")).unwrap(), b"old a");
        assert!(!at("b").exists());
        assert_eq!(std::fs::read(at("c")).unwrap(), b"old c");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
        // And all of them replaced when nothing fails.
        let files = vec![
            written(&at("a"), b"new a").replacing(true),
            written(&at("c"), b"new c").replacing(true),
        ];
        commit_all(files).unwrap();
        assert_eq!(std::fs::read(at("a")).unwrap(), b"new a");
        assert_eq!(std::fs::read(at("c")).unwrap(), b"new c");
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let at = |n: &str| dir.path().join(n);
        // A pid that is not running: a child that has exited and been reaped.
        let dead = std::process::Command::new("true")
            .spawn()
            .map(|mut c| {
                let id = c.id();
                c.wait().unwrap();
                id
            })
            .unwrap();
        let live = std::process::id();
        std::fs::write(at(&format!(".x.vma.partial-{dead}")), b"stale").unwrap();
        std::fs::write(at(&format!(".y.partial-{}", 1)), b"pid 1 lives").unwrap();
        std::fs::write(at(&format!("x.partial-{dead}")), b"not hidden").unwrap();
        std::fs::write(at(&format!(".x.partial-{dead}.keep")), b"other").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", at(&format!(".z.partial-{dead}"))).unwrap();
        // Ours, open and locked.
        let mine = AtomicFile::create(&at("w")).unwrap();
        assert!(mine.tmp.ends_with(format!(".w.partial-{live}")));
        let removed = remove_stale_temporaries(dir.path()).unwrap();
        assert_eq!(
            removed,
            vec![StaleTemporary {
                path: at(&format!(".x.vma.partial-{dead}")),
                pid: dead,
                size: 5
            }]
        );
        assert!(mine.tmp.exists());
        assert!(at(&format!(".z.partial-{dead}")).symlink_metadata().is_ok());
        assert!(std::path::Path::new("/etc/passwd").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 5);
    }
}

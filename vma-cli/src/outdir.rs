//! The directory `extract` writes into: refused at once when it is a file,
//! and removed again (with the parents the run made) when the run fails
//! before committing anything, or is interrupted by a signal (see
//! [`crate::signals`]), so a failed extract leaves no empty directories
//! behind.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Result};

/// The directories the running extract may have made, outermost first,
/// for the signal thread ([`remove_made`]).
static MADE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remove the empty directories the running extract made (innermost
/// first; those not made yet are passed over). Returns those removed.
pub(crate) fn remove_made() -> Vec<PathBuf> {
    let made = match MADE.lock() {
        Ok(mut m) => std::mem::take(&mut *m),
        Err(_) => return Vec::new(),
    };
    remove_empty(&made)
}

fn remove_empty(made: &[PathBuf]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for d in made.iter().rev() {
        match std::fs::remove_dir(d) {
            Ok(()) => removed.push(d.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => break,
        }
    }
    removed
}

/// The directories a run would create for `dir`, outermost first.
pub(crate) struct TargetDir {
    created: Vec<PathBuf>,
}

impl TargetDir {
    /// Check `dir` before anything is read: an existing path must be a
    /// directory; the missing ones on the way are noted.
    pub(crate) fn check(dir: &Path) -> Result<TargetDir> {
        if let Ok(m) = std::fs::metadata(dir) {
            if !m.is_dir() {
                bail!(
                    "{} is a file, not a directory: extract writes a directory of drive and config files (give a new or existing directory)",
                    dir.display()
                );
            }
            return Ok(TargetDir {
                created: Vec::new(),
            });
        }
        let mut created = Vec::new();
        let mut p = Some(dir);
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            match std::fs::symlink_metadata(d) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => bail!(
                    "{} is a file, not a directory, so {} cannot be made",
                    d.display(),
                    dir.display()
                ),
                Err(_) => created.push(d.to_path_buf()),
            }
            p = d.parent();
        }
        created.reverse();
        if let Ok(mut m) = MADE.lock() {
            m.clone_from(&created);
        }
        Ok(TargetDir { created })
    }

    /// After a failed run: remove the directories it made, if empty.
    pub(crate) fn undo(&self) {
        self.keep();
        remove_empty(&self.created);
    }

    /// After a successful run: a signal no longer removes the directories.
    pub(crate) fn keep(&self) {
        if let Ok(mut m) = MADE.lock() {
            m.clear();
        }
    }
}

//! The directory `extract` writes into: refused at once when it is a file,
//! and removed again (with the parents the run made) when the run fails
//! before committing anything, so a failed extract leaves no empty
//! directories behind.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

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
        Ok(TargetDir { created })
    }

    /// After a failed run: remove the directories it made, if empty.
    pub(crate) fn undo(&self) {
        for d in self.created.iter().rev() {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
}

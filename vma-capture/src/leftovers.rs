//! What a capture that could not clean up (killed with SIGKILL, or the
//! machine running `vma` lost) leaves in QEMU, found and removed before a
//! new capture starts: its backup and fleecing jobs, NBD exports, view,
//! scratch and NBD target nodes (all named `vma-...`), scratch image files
//! and frozen bitmap copies. Without this, the next capture would fail on
//! the names still in use.
//!
//! A capture is alive while its NBD server answers: every `vma-target-*`
//! node names the unix socket of the server it writes to. If one answers,
//! nothing is touched and the new capture is refused. Checkpoint bitmaps
//! (`vma-<uuid>`) are kept: a bitmap may be the base of an archive kept
//! elsewhere, and one that is not costs only a little memory.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{CaptureError, Result};
use crate::qmp::{
    BlockDirtyBitmapRemove, BlockExportDel, BlockdevDel, JobDismiss, Qmp, QueryBlockExports,
    QueryJobs, QueryNamedBlockNodes,
};

/// Prefix of every job, node and export name a capture uses.
const PREFIX: &str = "vma-";

/// The unix socket in an NBD node's file name (`nbd+unix:///EXPORT?socket=PATH`).
fn nbd_socket(file: &str) -> Option<PathBuf> {
    let query = file.strip_prefix("nbd+unix://")?.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("socket="))
        .map(PathBuf::from)
}

/// True when something listens on the unix socket `path`.
fn answers(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Remove what a dead capture left; returns a line per thing removed (empty
/// when nothing was left). Refuses when another capture is still running.
pub(crate) fn clear(qmp: &Qmp) -> Result<Vec<String>> {
    let nodes = qmp.run(&QueryNamedBlockNodes { flat: true })?;
    let ours = |name: &str, kind: &str| name.starts_with(&format!("{PREFIX}{kind}-"));
    let targets: Vec<_> = nodes
        .iter()
        .filter(|n| ours(&n.node_name, "target"))
        .collect();
    for t in &targets {
        if let Some(socket) = nbd_socket(&t.file).filter(|s| answers(s)) {
            return Err(CaptureError::Invalid(format!(
                "another vma capture is running on this QEMU (its NBD server {} answers, node {}); wait for it to end",
                socket.display(),
                t.node_name
            )));
        }
    }
    let jobs: Vec<String> = qmp
        .run(&QueryJobs)?
        .into_iter()
        .map(|j| j.id)
        .filter(|id| id.starts_with(PREFIX))
        .collect();
    let exports: Vec<String> = qmp
        .run(&QueryBlockExports)?
        .into_iter()
        .map(|e| e.id)
        .filter(|id| id.starts_with(PREFIX))
        .collect();
    let mut removed = Vec::new();
    // Top down: exports, then the jobs (which hold the views, filters and
    // targets), then the nodes.
    for id in &exports {
        if qmp.run(&BlockExportDel::hard(id)).is_ok() {
            removed.push(format!("NBD export {id}"));
        }
    }
    if !exports.is_empty() {
        // Deleting an export finishes in the background.
        std::thread::sleep(Duration::from_millis(200));
    }
    if !qmp.cancel_jobs(&jobs, Duration::from_secs(30))? {
        return Err(CaptureError::Invalid(format!(
            "jobs {} left by an earlier capture did not stop within 30 s of being cancelled",
            jobs.join(", ")
        )));
    }
    for id in &jobs {
        if qmp.run(&JobDismiss::new(id)).is_ok() {
            removed.push(format!("job {id}"));
        }
    }
    for kind in ["view", "scratch", "target"] {
        for n in nodes.iter().filter(|n| ours(&n.node_name, kind)) {
            let node_name = n.node_name.clone();
            if qmp.run(&BlockdevDel { node_name }).is_ok() {
                removed.push(format!("node {}", n.node_name));
            }
            if kind == "scratch" {
                let file = PathBuf::from(&n.file);
                let named_ours = file
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with("vma-scratch-"));
                if named_ours && std::fs::remove_file(&file).is_ok() {
                    removed.push(format!("scratch image {}", file.display()));
                }
            }
        }
    }
    for n in &nodes {
        for b in n.dirty_bitmaps.iter().flatten() {
            let name = b.name.as_str();
            if name.starts_with(PREFIX)
                && name.ends_with("-frozen")
                && qmp
                    .run(&BlockDirtyBitmapRemove::new(&n.node_name, name))
                    .is_ok()
            {
                removed.push(format!("bitmap {name} of {}", n.node_name));
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_socket_of_an_nbd_node() {
        assert_eq!(
            nbd_socket("nbd+unix:///disk0?socket=/tmp/vma-capture-1-ab.sock"),
            Some(PathBuf::from("/tmp/vma-capture-1-ab.sock"))
        );
        assert_eq!(
            nbd_socket("nbd+unix:///?socket=/run/x.sock"),
            Some(PathBuf::from("/run/x.sock"))
        );
        assert_eq!(nbd_socket("/var/lib/disk.qcow2"), None);
        assert_eq!(nbd_socket("nbd+unix:///disk0"), None);
    }
}

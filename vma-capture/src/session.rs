//! A capture's session with QEMU, shared by both ways of capturing
//! (backup jobs in [`crate::backup`], comparison in [`crate::live_diff`]):
//! connecting (and clearing what a dead capture left), finding the drives,
//! naming their new checkpoint bitmaps, and freezing the guest around the
//! `transaction` that sets the point in time.

use std::collections::HashMap;
use std::path::Path;

use vma_core::{ArchiveMeta, DriveId, DriveInfo};

use crate::error::{CaptureError, Result};
use crate::options::{CaptureOptions, DriveSpec};
use crate::qga::GuestAgent;
use crate::qmp::{BlockDirtyBitmapAdd, Qmp, QueryBlock, QueryNamedBlockNodes, Transaction};
use crate::record::DriveCheckpoint;

/// One drive as found in QEMU.
pub(crate) struct Drive {
    pub(crate) id: DriveId,
    pub(crate) name: String,
    pub(crate) node: String,
    pub(crate) size: u64,
    /// Parent checkpoint bitmap to read from, when incremental.
    pub(crate) base_bitmap: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) bitmap: String,
    pub(crate) persistent: bool,
}

impl Drive {
    /// The drive as the archive header lists it.
    pub(crate) fn info(&self) -> DriveInfo {
        DriveInfo {
            id: self.id,
            name: self.name.clone(),
            size: self.size,
        }
    }
}

/// Connect to the QEMU at `options.qmp` and remove what a capture that
/// could not clean up left there; returns the connection and a line per
/// thing removed.
pub(crate) fn connect(options: &CaptureOptions) -> Result<(Qmp, Vec<String>)> {
    let qmp = Qmp::connect(&options.qmp)?;
    let cleared = crate::leftovers::clear(&qmp)?;
    Ok((qmp, cleared))
}

/// Name every drive's new checkpoint bitmap after the new archive
/// (`vma-<uuid>`); returns the uuid in hex.
pub(crate) fn name_checkpoints(drives: &mut [Drive], meta: &ArchiveMeta) -> String {
    let uuid_hex = hex_uuid(&meta.uuid);
    for d in drives {
        d.bitmap = format!("vma-{uuid_hex}");
    }
    uuid_hex
}

/// The new checkpoint bitmap of drive `d`.
pub(crate) fn checkpoint_bitmap(d: &Drive) -> BlockDirtyBitmapAdd {
    BlockDirtyBitmapAdd {
        granularity: Some(65536),
        persistent: Some(d.persistent),
        ..BlockDirtyBitmapAdd::new(&d.node, &d.bitmap)
    }
}

/// How drive `d` is captured, for the capture record.
pub(crate) fn checkpoint_of(d: &Drive) -> DriveCheckpoint {
    DriveCheckpoint {
        name: d.name.clone(),
        node: d.node.clone(),
        size: d.size,
        bitmap: d.bitmap.clone(),
        backup: if d.base_bitmap.is_some() {
            "incremental".into()
        } else {
            "full".into()
        },
        reason: d.reason.clone(),
    }
}

/// Run `f` (the transaction that sets the point in time) with the guest's
/// file systems frozen through the agent at `agent`, if given; they are
/// thawed whatever `f` returns. `Err` if the freeze failed (`f` did not
/// run); else what `f` returned and whether the thaw worked.
fn with_frozen_guest<T>(
    agent: Option<&Path>,
    f: impl FnOnce() -> Result<T>,
) -> Result<(Result<T>, Result<()>)> {
    let mut agent = agent.map(GuestAgent::connect).transpose()?;
    if let Some(a) = agent.as_mut() {
        if let Err(e) = a.freeze() {
            // A freeze that failed half-way may have frozen some file systems.
            let _ = a.thaw();
            return Err(e.into());
        }
    }
    let result = f();
    let thawed = match agent.as_mut() {
        Some(a) => a.thaw().map(drop).map_err(CaptureError::from),
        None => Ok(()),
    };
    Ok((result, thawed))
}

/// Run `transaction`, the instant that sets the point in time, with the
/// guest frozen through the agent at `agent` (see [`with_frozen_guest`]).
pub(crate) fn run_frozen(
    qmp: &Qmp,
    agent: Option<&Path>,
    transaction: &Transaction,
) -> Result<(Result<()>, Result<()>)> {
    with_frozen_guest(agent, || {
        qmp.run(transaction).map(drop).map_err(CaptureError::from)
    })
}

/// Resolve the drives to capture: each spec names a node (`query-named-
/// block-nodes`) or a device (`query-block`, whose medium's node is used).
pub(crate) fn find_drives(qmp: &Qmp, specs: &[DriveSpec]) -> Result<Vec<Drive>> {
    let nodes = qmp.run(&QueryNamedBlockNodes { flat: true })?;
    let devices = qmp.run(&QueryBlock)?;
    let mut chosen: Vec<(String, String)> = Vec::new(); // (node, name)
    if specs.is_empty() {
        for dev in &devices {
            let Some(ins) = &dev.inserted else { continue };
            let name = if dev.device.is_empty() {
                dev.qdev.clone().unwrap_or_else(|| ins.node_name.clone())
            } else {
                dev.device.clone()
            };
            chosen.push((ins.node_name.clone(), name));
        }
        if chosen.is_empty() {
            return Err(CaptureError::Invalid(
                "QEMU lists no device with a medium; name the nodes with --drive NODE[=NAME]"
                    .into(),
            ));
        }
    }
    for spec in specs {
        let (node, default_name) = if nodes.iter().any(|n| n.node_name == spec.node) {
            (spec.node.clone(), spec.node.clone())
        } else if let Some(ins) = devices
            .iter()
            .find(|d| d.device == spec.node || d.qdev.as_deref() == Some(&spec.node))
            .and_then(|d| d.inserted.as_ref())
        {
            (ins.node_name.clone(), spec.node.clone())
        } else {
            return Err(CaptureError::Invalid(format!(
                "QEMU has no block node or device named {:?}",
                spec.node
            )));
        };
        chosen.push((node, spec.name.clone().unwrap_or(default_name)));
    }
    let mut seen = HashMap::new();
    let mut drives = Vec::new();
    for (i, (node, name)) in chosen.into_iter().enumerate() {
        vma_core::format::check_name(&name).map_err(|e| {
            CaptureError::Invalid(format!(
                "drive name {name:?}: {e} (give one with --drive NODE=NAME)"
            ))
        })?;
        if let Some(prev) = seen.insert(name.clone(), node.clone()) {
            return Err(CaptureError::Invalid(format!(
                "nodes {prev} and {node} would both be drive {name:?}"
            )));
        }
        let info = nodes.iter().find(|n| n.node_name == node).ok_or_else(|| {
            CaptureError::Invalid(format!(
                "block node {node} is not listed by query-named-block-nodes"
            ))
        })?;
        if i >= 255 {
            return Err(CaptureError::Invalid(
                "an archive holds at most 255 drives".into(),
            ));
        }
        drives.push(Drive {
            id: DriveId(i as u8 + 1),
            name,
            node: node.clone(),
            size: info.image.virtual_size,
            base_bitmap: None,
            reason: None,
            bitmap: String::new(),
            persistent: info.drv == "qcow2",
        });
    }
    Ok(drives)
}

/// `uuid` in lower-case hex.
pub(crate) fn hex_uuid(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

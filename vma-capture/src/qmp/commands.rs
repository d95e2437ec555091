//! Every QMP command capture sends, as a type: the value is the command's
//! arguments (serialized as QEMU's QAPI schema names them), the type knows
//! the command's name and the type of its reply. [`super::Qmp::run`] runs
//! any [`Command`]; a [`Transaction`] takes any [`Action`].

use std::fmt;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::ser::{Error as _, SerializeStruct};
use serde::{Serialize, Serializer};
use serde_json::Value;

use super::{BlockDeviceInfo, BlockExportInfo, BlockInfo, Empty, JobInfo, StatusInfo, VersionInfo};

/// A QMP command: its arguments are the value itself (a value that
/// serializes to `null`, such as a unit struct, sends none).
pub trait Command: Serialize {
    /// The command's name, e.g. `blockdev-add`.
    const NAME: &'static str;
    /// What the command's `return` holds.
    type Reply: DeserializeOwned;
}

/// A command QEMU can also run as an action of a `transaction`.
pub trait Action: Command<Reply = Empty> {}

/// Implements [`Command`] (and [`Action`] where marked) for a type.
macro_rules! command {
    ($type:ty => $name:literal, action) => {
        command!($type => $name, Empty);
        impl Action for $type {}
    };
    ($type:ty => $name:literal, $reply:ty) => {
        impl Command for $type {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}

/// `qmp_capabilities`: leave capabilities negotiation (none are enabled).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QmpCapabilities;
command!(QmpCapabilities => "qmp_capabilities", Empty);

/// `query-version`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryVersion;
command!(QueryVersion => "query-version", VersionInfo);

/// `query-status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryStatus;
command!(QueryStatus => "query-status", StatusInfo);

/// `query-block`: the guest block devices.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryBlock;
command!(QueryBlock => "query-block", Vec<BlockInfo>);

/// `query-named-block-nodes`: with `flat`, every named node, without
/// their backing chains repeated inside them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Leave out the nested backing images.
    pub flat: bool,
}
command!(QueryNamedBlockNodes => "query-named-block-nodes", Vec<BlockDeviceInfo>);

/// `query-jobs`: every job that has not been dismissed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryJobs;
command!(QueryJobs => "query-jobs", Vec<JobInfo>);

/// `query-block-exports`: the exports of QEMU's own NBD server.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryBlockExports;
command!(QueryBlockExports => "query-block-exports", Vec<BlockExportInfo>);

/// How a node passes discards on (QAPI `BlockdevDiscardOptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    /// Dropped.
    Ignore,
    /// Passed on to the layer below.
    Unmap,
}

/// Cache options of a node (QAPI `BlockdevCacheOptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cache {
    /// Ignore flush requests (nothing needs to survive a crash).
    pub no_flush: bool,
}

/// A unix socket address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnixSocketAddress {
    /// Socket path.
    pub path: PathBuf,
}

/// A socket address (QAPI `SocketAddress`: `{"type": "unix", "path": ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    /// A unix socket.
    Unix(UnixSocketAddress),
}

/// The older form of a socket address that `nbd-server-start` takes
/// (QAPI `SocketAddressLegacy`: `{"type": "unix", "data": {"path": ...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum SocketAddressLegacy {
    /// A unix socket.
    Unix(UnixSocketAddress),
}

/// A node given by name, or a new node described in place (QAPI
/// `BlockdevRef`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    /// An existing node.
    Node(String),
    /// A node created with its parent.
    Options(Box<BlockdevOptions>),
}

/// The driver of a node and its driver-specific options.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum Driver {
    /// A host file.
    File {
        /// Its path.
        filename: PathBuf,
    },
    /// A qcow2 image in `file`.
    Qcow2 {
        /// The node holding the image.
        file: BlockdevRef,
    },
    /// The point-in-time view of a `copy-before-write` filter `file`.
    SnapshotAccess {
        /// The filter node.
        file: BlockdevRef,
    },
    /// An export of an NBD server.
    Nbd {
        /// The server.
        server: SocketAddress,
        /// The export name.
        export: String,
    },
    /// A host block device (QEMU spells this driver with an underscore).
    #[serde(rename = "host_device")]
    HostDevice {
        /// Its path.
        filename: PathBuf,
    },
    /// Raw bytes of `file`, optionally a window of it.
    Raw {
        /// The node holding the bytes.
        file: BlockdevRef,
        /// Bytes of `file` the node shows (from the start); all if unset.
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    },
    /// A qcow2 image in `file` that opens no backing image, whatever its
    /// header names (`"backing": null`).
    #[serde(rename = "qcow2")]
    Qcow2Alone {
        /// The node holding the image.
        file: BlockdevRef,
        /// Always `None`: serialized as `null`.
        backing: Option<String>,
    },
    /// A node that reads zeros and drops writes.
    NullCo {
        /// Its size in bytes.
        size: u64,
    },
}

/// A block node (QAPI `BlockdevOptions`, the options capture uses).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptions {
    /// Node name (QEMU makes one up if none is given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// How discards are passed on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard: Option<Discard>,
    /// Cache options.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// The driver and its options.
    #[serde(flatten)]
    pub driver: Driver,
}

impl BlockdevOptions {
    /// A node named `node_name` of `driver`, with QEMU's defaults.
    pub fn new(node_name: &str, driver: Driver) -> BlockdevOptions {
        BlockdevOptions {
            node_name: Some(node_name.to_owned()),
            ..BlockdevOptions::unnamed(driver)
        }
    }

    /// A node without a name (one described inside its parent's options).
    pub fn unnamed(driver: Driver) -> BlockdevOptions {
        BlockdevOptions {
            node_name: None,
            discard: None,
            cache: None,
            driver,
        }
    }
}

/// `blockdev-add`: add a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockdevAdd(pub BlockdevOptions);
command!(BlockdevAdd => "blockdev-add", Empty);

/// `blockdev-del`: remove a node nothing uses any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node.
    pub node_name: String,
}
command!(BlockdevDel => "blockdev-del", Empty);

/// `sync` mode of a backup job (QAPI `MirrorSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// Copy the whole disk.
    Full,
    /// Copy what the top image allocates.
    Top,
    /// Copy only what is about to be overwritten (copy-before-write).
    None,
    /// Copy what the bitmap marks.
    Bitmap,
}

/// What happens to the bitmap of a backup job (QAPI `BitmapSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapSyncMode {
    /// Cleared of the copied bits only if the job succeeds.
    OnSuccess,
    /// Left alone.
    Never,
    /// Cleared of the copied bits whatever the outcome.
    Always,
}

/// Performance options of a backup job (QAPI `BackupPerf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupPerf {
    /// Smallest cluster the job copies (QEMU 9.1 and later).
    pub min_cluster_size: u64,
}

/// `blockdev-backup`: start a backup job (QAPI `BlockdevBackup`). Build
/// with [`BlockdevBackup::new`] and struct update syntax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    /// Job id.
    pub job_id: String,
    /// Source node (or device) name.
    pub device: String,
    /// Target node name.
    pub target: String,
    /// What to copy.
    pub sync: SyncMode,
    /// Bitmap to copy from (sync `bitmap`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// What happens to `bitmap`; required by QEMU when `bitmap` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Rate limit in bytes per second (0 or unset: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// Whether the job finalizes by itself (QEMU default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// Whether the job disappears when concluded (QEMU default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Name for the copy-before-write filter node the job inserts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
    /// Discard what was copied from the source (QEMU 9.1 and later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard_source: Option<bool>,
    /// Performance options.
    #[serde(rename = "x-perf", skip_serializing_if = "Option::is_none")]
    pub x_perf: Option<BackupPerf>,
}

impl BlockdevBackup {
    /// A backup with only the required arguments.
    pub fn new(job_id: &str, device: &str, target: &str, sync: SyncMode) -> Self {
        BlockdevBackup {
            job_id: job_id.to_owned(),
            device: device.to_owned(),
            target: target.to_owned(),
            sync,
            bitmap: None,
            bitmap_mode: None,
            speed: None,
            auto_finalize: None,
            auto_dismiss: None,
            filter_node_name: None,
            discard_source: None,
            x_perf: None,
        }
    }
}
command!(BlockdevBackup => "blockdev-backup", action);

/// Which job a job command acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobId {
    /// Job id.
    pub id: String,
}

impl JobId {
    /// The job `id`.
    pub fn new(id: &str) -> JobId {
        JobId { id: id.to_owned() }
    }
}

/// Gives the newtype commands over [`JobId`] or [`BlockDirtyBitmap`] a
/// constructor from the wrapped type's parts.
macro_rules! newtype_new {
    ($($type:ident)*, JobId) => {$(
        impl $type {
            /// The command for job `id`.
            pub fn new(id: &str) -> $type {
                $type(JobId::new(id))
            }
        }
    )*};
    ($($type:ident)*, BlockDirtyBitmap) => {$(
        impl $type {
            /// The command for bitmap `name` of `node`.
            pub fn new(node: &str, name: &str) -> $type {
                $type(BlockDirtyBitmap::new(node, name))
            }
        }
    )*};
}

/// `job-finalize`: let a pending job make its graph changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobFinalize(pub JobId);
command!(JobFinalize => "job-finalize", Empty);

/// `job-dismiss`: remove a concluded job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobDismiss(pub JobId);
command!(JobDismiss => "job-dismiss", Empty);

/// `job-cancel`: ask a job to stop; it concludes with an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobCancel(pub JobId);
command!(JobCancel => "job-cancel", Empty);

newtype_new!(JobFinalize JobDismiss JobCancel, JobId);

/// A dirty bitmap of a node (QAPI `BlockDirtyBitmap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmap {
    /// The node.
    pub node: String,
    /// The bitmap's name.
    pub name: String,
}

impl BlockDirtyBitmap {
    /// Bitmap `name` of `node`.
    pub fn new(node: &str, name: &str) -> BlockDirtyBitmap {
        BlockDirtyBitmap {
            node: node.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// `block-dirty-bitmap-add` (QAPI `BlockDirtyBitmapAdd`). Build with
/// [`BlockDirtyBitmapAdd::new`] and struct update syntax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapAdd {
    /// Node the bitmap tracks.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    /// Granularity in bytes (QEMU default: 64 KiB or the cluster size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u32>,
    /// Whether to store it in the image (qcow2 only; default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Whether it starts disabled (not recording; default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

impl BlockDirtyBitmapAdd {
    /// A bitmap with QEMU's defaults.
    pub fn new(node: &str, name: &str) -> Self {
        BlockDirtyBitmapAdd {
            node: node.to_owned(),
            name: name.to_owned(),
            granularity: None,
            persistent: None,
            disabled: None,
        }
    }
}
command!(BlockDirtyBitmapAdd => "block-dirty-bitmap-add", action);

/// `block-dirty-bitmap-remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapRemove(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapRemove => "block-dirty-bitmap-remove", action);

/// `block-dirty-bitmap-clear`: mark everything clean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapClear(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapClear => "block-dirty-bitmap-clear", action);

/// `block-dirty-bitmap-enable`: start recording writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapEnable(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapEnable => "block-dirty-bitmap-enable", action);

/// `block-dirty-bitmap-disable`: stop recording writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapDisable(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapDisable => "block-dirty-bitmap-disable", action);

newtype_new!(
    BlockDirtyBitmapRemove BlockDirtyBitmapClear BlockDirtyBitmapEnable BlockDirtyBitmapDisable,
    BlockDirtyBitmap
);

/// A bitmap to merge from: one of the target's node, or of any node
/// (QAPI `BlockDirtyBitmapOrStr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BitmapSource {
    /// A bitmap of the target's node.
    Local(String),
    /// A bitmap of another node.
    Node(BlockDirtyBitmap),
}

/// `block-dirty-bitmap-merge`: merge `bitmaps` into bitmap `target` of
/// `node` (QAPI `BlockDirtyBitmapMerge`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapMerge {
    /// Node of the target bitmap.
    pub node: String,
    /// Target bitmap.
    pub target: String,
    /// The bitmaps merged in.
    pub bitmaps: Vec<BitmapSource>,
}
command!(BlockDirtyBitmapMerge => "block-dirty-bitmap-merge", action);

/// `block-export-add` of an NBD export on QEMU's NBD server (QAPI
/// `BlockExportOptions` with type `nbd`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportAdd {
    /// Always `nbd`.
    #[serde(rename = "type")]
    pub export_type: &'static str,
    /// Export id.
    pub id: String,
    /// Node exported.
    pub node_name: String,
    /// Export name clients ask for.
    pub name: String,
    /// Whether clients may write.
    pub writable: bool,
}

impl BlockExportAdd {
    /// Export `node_name` over NBD as `name`, with id `id`.
    pub fn nbd(id: &str, node_name: &str, name: &str, writable: bool) -> BlockExportAdd {
        BlockExportAdd {
            export_type: "nbd",
            id: id.to_owned(),
            node_name: node_name.to_owned(),
            name: name.to_owned(),
            writable,
        }
    }
}
command!(BlockExportAdd => "block-export-add", Empty);

/// How `block-export-del` treats connected clients (QAPI
/// `BlockExportRemoveMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportRemoveMode {
    /// Wait until they disconnect.
    Safe,
    /// Disconnect them.
    Hard,
}

/// `block-export-del`: remove an export (finishes in the background).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportDel {
    /// Export id.
    pub id: String,
    /// What happens to connected clients.
    pub mode: ExportRemoveMode,
}
command!(BlockExportDel => "block-export-del", Empty);

impl BlockExportDel {
    /// Remove export `id`, disconnecting its clients.
    pub fn hard(id: &str) -> BlockExportDel {
        BlockExportDel {
            id: id.to_owned(),
            mode: ExportRemoveMode::Hard,
        }
    }
}

/// `nbd-server-start`: start QEMU's NBD server (it has one at most).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NbdServerStart {
    /// Where it listens.
    pub addr: SocketAddressLegacy,
}
command!(NbdServerStart => "nbd-server-start", Empty);

/// `nbd-server-stop`: stop QEMU's NBD server and its exports.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NbdServerStop;
command!(NbdServerStop => "nbd-server-stop", Empty);

/// `quit`: end QEMU (cleanly: images are closed).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Quit;
command!(Quit => "quit", Empty);

/// `transaction`: actions that all take effect at one instant, or none.
/// Add actions with [`Transaction::push`]; run it with [`super::Qmp::run`].
#[derive(Clone, Default)]
pub struct Transaction {
    /// `{"type": NAME, "data": arguments}` per action.
    actions: Vec<Value>,
    /// With `completion-mode: grouped`.
    grouped: bool,
    /// Why an action could not be put into JSON; running fails with it.
    unencodable: Option<String>,
}
command!(Transaction => "transaction", Empty);

impl Transaction {
    /// An empty transaction.
    pub fn new() -> Transaction {
        Transaction::default()
    }

    /// An empty transaction with `completion-mode: grouped`: if one job it
    /// starts fails, QEMU cancels the others.
    pub fn grouped() -> Transaction {
        Transaction {
            grouped: true,
            ..Transaction::default()
        }
    }

    /// Add `action`.
    pub fn push<A: Action>(&mut self, action: &A) -> &mut Transaction {
        match serde_json::to_value(action) {
            Ok(data) => self
                .actions
                .push(serde_json::json!({ "type": A::NAME, "data": data })),
            Err(e) => {
                self.unencodable
                    .get_or_insert_with(|| format!("action {}: {e}", A::NAME));
            }
        }
        self
    }

    /// Like [`Transaction::push`], by value.
    pub fn with<A: Action>(mut self, action: &A) -> Transaction {
        self.push(action);
        self
    }

    /// Number of actions.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// Whether it has no action.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("actions", &self.actions)
            .field("grouped", &self.grouped)
            .finish()
    }
}

impl Serialize for Transaction {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if let Some(why) = &self.unencodable {
            return Err(S::Error::custom(why));
        }
        let mut s = serializer.serialize_struct("Transaction", 2)?;
        s.serialize_field("actions", &self.actions)?;
        if self.grouped {
            let properties = serde_json::json!({ "completion-mode": "grouped" });
            s.serialize_field("properties", &properties)?;
        } else {
            s.skip_field("properties")?;
        }
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builds_arguments_and_actions() {
        let backup = BlockdevBackup {
            bitmap: Some("b0".into()),
            bitmap_mode: Some(BitmapSyncMode::OnSuccess),
            auto_finalize: Some(false),
            discard_source: Some(false),
            ..BlockdevBackup::new("j0", "drive0", "nbd0", SyncMode::Bitmap)
        };
        let bitmap = BlockDirtyBitmapAdd {
            persistent: Some(false),
            ..BlockDirtyBitmapAdd::new("drive0", "b1")
        };
        let merge = BlockDirtyBitmapMerge {
            node: "n".into(),
            target: "t".into(),
            bitmaps: vec![
                BitmapSource::Local("a".into()),
                BitmapSource::Node(BlockDirtyBitmap::new("m", "b")),
            ],
        };
        let clear = BlockDirtyBitmapClear::new("n", "b");
        let transaction = Transaction::new()
            .with(&backup)
            .with(&bitmap)
            .with(&merge)
            .with(&clear);
        assert_eq!(transaction.len(), 4);
        assert_eq!(
            serde_json::to_value(&transaction).unwrap(),
            json!({"actions": [
                {"type": "blockdev-backup", "data": {
                    "job-id": "j0", "device": "drive0", "target": "nbd0", "sync": "bitmap",
                    "bitmap": "b0", "bitmap-mode": "on-success", "auto-finalize": false,
                    "discard-source": false}},
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "drive0", "name": "b1", "persistent": false}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "n", "target": "t", "bitmaps": ["a", {"node": "m", "name": "b"}]}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": "n", "name": "b"}},
            ]})
        );
        let grouped = Transaction::grouped().with(&clear);
        assert_eq!(
            serde_json::to_value(&grouped).unwrap()["properties"],
            json!({"completion-mode": "grouped"})
        );
    }

    #[test]
    fn commands_have_qemus_argument_shapes() {
        let nbd = BlockdevAdd(BlockdevOptions::new(
            "t0",
            Driver::Nbd {
                server: SocketAddress::Unix(UnixSocketAddress {
                    path: "/run/s.sock".into(),
                }),
                export: "disk".into(),
            },
        ));
        assert_eq!(
            serde_json::to_value(&nbd).unwrap(),
            json!({"driver": "nbd", "node-name": "t0",
                   "server": {"type": "unix", "path": "/run/s.sock"}, "export": "disk"})
        );
        let file = BlockdevOptions {
            discard: Some(Discard::Unmap),
            cache: Some(Cache { no_flush: true }),
            ..BlockdevOptions::unnamed(Driver::File {
                filename: "/s.qcow2".into(),
            })
        };
        let qcow2 = BlockdevAdd(BlockdevOptions::new(
            "s0",
            Driver::Qcow2 {
                file: BlockdevRef::Options(Box::new(file)),
            },
        ));
        assert_eq!(
            serde_json::to_value(&qcow2).unwrap(),
            json!({"driver": "qcow2", "node-name": "s0", "file": {
                "driver": "file", "filename": "/s.qcow2", "discard": "unmap",
                "cache": {"no-flush": true}}})
        );
        // QEMU's driver names are not all kebab-case.
        let device = BlockdevAdd(BlockdevOptions::new(
            "d0",
            Driver::HostDevice {
                filename: "/dev/loop0".into(),
            },
        ));
        assert_eq!(
            serde_json::to_value(&device).unwrap(),
            json!({"driver": "host_device", "node-name": "d0", "filename": "/dev/loop0"})
        );
        let start = NbdServerStart {
            addr: SocketAddressLegacy::Unix(UnixSocketAddress {
                path: "/run/q.sock".into(),
            }),
        };
        assert_eq!(
            serde_json::to_value(&start).unwrap(),
            json!({"addr": {"type": "unix", "data": {"path": "/run/q.sock"}}})
        );
        assert_eq!(
            serde_json::to_value(BlockExportAdd::nbd("e0", "v0", "view", false)).unwrap(),
            json!({"type": "nbd", "id": "e0", "node-name": "v0", "name": "view", "writable": false})
        );
        assert_eq!(
            serde_json::to_value(BlockExportDel::hard("e0")).unwrap(),
            json!({"id": "e0", "mode": "hard"})
        );
        assert_eq!(
            serde_json::to_value(JobFinalize::new("j0")).unwrap(),
            json!({"id": "j0"})
        );
        assert_eq!(serde_json::to_value(QueryJobs).unwrap(), Value::Null);
        assert_eq!(
            serde_json::to_value(QueryNamedBlockNodes { flat: true }).unwrap(),
            json!({"flat": true})
        );
    }

    #[test]
    fn an_action_that_cannot_be_encoded_fails_the_transaction() {
        use std::os::unix::ffi::OsStrExt;
        /// An action of the test's own with a path that is not UTF-8.
        #[derive(Serialize)]
        struct Odd {
            path: PathBuf,
        }
        command!(Odd => "odd", action);
        let odd = Odd {
            path: std::ffi::OsStr::from_bytes(b"\xff").into(),
        };
        let transaction = Transaction::new().with(&odd);
        let e = serde_json::to_value(&transaction).unwrap_err();
        assert!(e.to_string().contains("action odd"), "{e}");
    }
}

/// What a job does on an I/O error (QAPI `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// End the job with the error.
    Report,
    /// Go on (a mirror retries the same range for ever: never use it there).
    Ignore,
    /// Pause the job on ENOSPC, report any other error.
    Enospc,
    /// Pause the job; `job-resume` retries where it stopped.
    Stop,
}

/// `blockdev-mirror`: copy `device` to `target` while the guest runs, then
/// (on `job-complete`) put `target` in the device's place (QAPI
/// `BlockdevMirror`). Build with [`BlockdevMirror::new`] and struct update
/// syntax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    /// Job id.
    pub job_id: String,
    /// Source node (or device) name; the node replaced on completion.
    pub device: String,
    /// Target node name.
    pub target: String,
    /// What to copy.
    pub sync: SyncMode,
    /// Rate limit in bytes per second (0 or unset: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// What a read error of the source does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_source_error: Option<OnError>,
    /// What a write error of the target does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_target_error: Option<OnError>,
    /// Name for the filter node the job inserts above the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
    /// Whether the job disappears when concluded (QEMU default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}

impl BlockdevMirror {
    /// A mirror with only the required arguments.
    pub fn new(job_id: &str, device: &str, target: &str, sync: SyncMode) -> Self {
        BlockdevMirror {
            job_id: job_id.to_owned(),
            device: device.to_owned(),
            target: target.to_owned(),
            sync,
            speed: None,
            on_source_error: None,
            on_target_error: None,
            filter_node_name: None,
            auto_dismiss: None,
        }
    }
}
command!(BlockdevMirror => "blockdev-mirror", Empty);

/// `job-complete`: end a ready mirror, putting its target in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobComplete(pub JobId);
command!(JobComplete => "job-complete", Empty);

/// `job-resume`: resume a paused job (after an error with `stop`, where
/// it stopped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobResume(pub JobId);
command!(JobResume => "job-resume", Empty);

newtype_new!(JobComplete JobResume, JobId);

/// `human-monitor-command`: run a human monitor (HMP) command line, such
/// as `qemu-io -d vd0 "write 0 4k"`; the reply is its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    /// The command line.
    pub command_line: String,
}
command!(HumanMonitorCommand => "human-monitor-command", String);

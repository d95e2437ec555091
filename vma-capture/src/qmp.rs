//! QMP client: commands, replies and events over a unix socket.
//!
//! [`Qmp`] speaks the QEMU Machine Protocol with std threads only. A
//! background reader thread reads newline-delimited JSON from the socket;
//! `parse_message` classifies each line (greeting, reply, event or
//! something to ignore) without doing any I/O, so no byte sequence from
//! QEMU can make the client panic. Replies are routed by their `id` to
//! the thread waiting in [`Qmp::execute`]; events go into a queue that
//! [`Qmp::next_event`] and [`Qmp::wait_event`] take from.
//!
//! When the connection is lost (QEMU exits or is killed) every waiting
//! call and every later call returns [`Error::Disconnected`].
//!
//! Besides the raw [`Qmp::execute`], the module has typed replies for the
//! queries capture needs ([`BlockInfo`], [`BlockDeviceInfo`], [`JobInfo`]),
//! thin wrappers for the commands it sends, builders for `transaction`
//! actions in [`action`], and event payloads ([`JobStatusChange`],
//! [`BlockJobEvent`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// How long [`Qmp::execute`] waits for a reply unless told otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Qmp::connect`] waits for QEMU's greeting.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long sending one command may block before the connection is
/// given up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest line accepted from QEMU; a longer one ends the connection.
pub const MAX_LINE_LEN: usize = 64 << 20;

/// Most events kept unread; past this the oldest are dropped and counted
/// in [`Qmp::dropped_events`].
pub const MAX_PENDING_EVENTS: usize = 65_536;

/// Most bytes (as received) of events kept unread, the greeting's early
/// events included; past this the oldest are dropped as above.
pub const MAX_PENDING_EVENT_BYTES: usize = 16 << 20;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The monitor socket could not be opened.
    #[error("cannot connect to the QMP socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// QEMU sent something that breaks the protocol (e.g. no greeting).
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// No reply arrived in time.
    #[error("QMP command {command} got no reply within {timeout:?}")]
    Timeout {
        /// The command that was sent.
        command: String,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// No matching event arrived in time.
    #[error("no matching QMP event arrived within {timeout:?}")]
    EventTimeout {
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The connection to QEMU is gone (QEMU exited, was killed, or broke
    /// the protocol); the client cannot be used any more.
    #[error("QMP connection lost: {reason}")]
    Disconnected {
        /// What ended the connection.
        reason: String,
    },
    /// A reply or event did not have the expected shape.
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// What was being decoded, e.g. `reply to query-jobs`.
        what: String,
        /// Underlying error.
        source: serde_json::Error,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// QEMU version from the greeting, comparable: `v >= QemuVersion::new(9, 1, 0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl QemuVersion {
    /// Builds a version to compare against.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The greeting QEMU sends when a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU version.
    pub version: QemuVersion,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-2`.
    pub package: String,
    /// Capabilities the server offers (e.g. `oob`); none are enabled.
    pub capabilities: Vec<String>,
}

/// Time stamp of an event as QEMU reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `JOB_STATUS_CHANGE`.
    pub name: String,
    /// Event payload (`null` when QEMU sent none).
    pub data: Value,
    /// When QEMU emitted it, if the time stamp was readable.
    pub timestamp: Option<Timestamp>,
}

impl Event {
    /// A job changed status; payload [`JobStatusChange`].
    pub const JOB_STATUS_CHANGE: &'static str = "JOB_STATUS_CHANGE";
    /// A block job finished (check `error`); payload [`BlockJobEvent`].
    pub const BLOCK_JOB_COMPLETED: &'static str = "BLOCK_JOB_COMPLETED";
    /// A block job was cancelled; payload [`BlockJobEvent`].
    pub const BLOCK_JOB_CANCELLED: &'static str = "BLOCK_JOB_CANCELLED";
    /// A block job hit an I/O error; payload [`BlockJobEvent`].
    pub const BLOCK_JOB_ERROR: &'static str = "BLOCK_JOB_ERROR";
    /// A block job waits for `job-finalize`; payload [`BlockJobEvent`].
    pub const BLOCK_JOB_PENDING: &'static str = "BLOCK_JOB_PENDING";
    /// A block job is ready to complete; payload [`BlockJobEvent`].
    pub const BLOCK_JOB_READY: &'static str = "BLOCK_JOB_READY";

    /// Decodes the payload into `T`.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.data).map_err(|source| Error::Decode {
            what: format!("{} event data", self.name),
            source,
        })
    }

    /// The payload if this is a readable `JOB_STATUS_CHANGE`.
    pub fn job_status_change(&self) -> Option<JobStatusChange> {
        if self.name != Self::JOB_STATUS_CHANGE {
            return None;
        }
        self.data_as().ok()
    }

    /// The payload if this is a readable `BLOCK_JOB_*` event.
    pub fn block_job(&self) -> Option<BlockJobEvent> {
        if !self.name.starts_with("BLOCK_JOB_") {
            return None;
        }
        self.data_as().ok()
    }
}

/// Status of a job (QAPI `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// Erroneous default state.
    Undefined,
    /// Created, not yet started.
    Created,
    /// Running.
    Running,
    /// Running but paused.
    Paused,
    /// Ready for the user to signal completion (mirror).
    Ready,
    /// Ready but paused.
    Standby,
    /// Waiting for the other jobs of its transaction.
    Waiting,
    /// Work done; waits for `job-finalize` when auto-finalize is off.
    Pending,
    /// Being aborted; will conclude with an error.
    Aborting,
    /// Finished; waits for `job-dismiss` when auto-dismiss is off.
    Concluded,
    /// Being dismantled; gone afterwards.
    Null,
    /// A status this client does not know.
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    /// QAPI name, e.g. `pending`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
            JobStatus::Unknown => "unknown",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Payload of `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobStatusChange {
    /// Job id.
    pub id: String,
    /// New status.
    pub status: JobStatus,
}

/// Payload of the `BLOCK_JOB_*` events. Which fields are present depends
/// on the event: `PENDING` has `id` and `type`; `COMPLETED`, `CANCELLED`
/// and `READY` have `device`, `type`, `len`, `offset`, `speed` (and
/// `error` on failure); `ERROR` has `device`, `operation` and `action`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobEvent {
    /// Job id (named `device` for historical reasons).
    pub device: Option<String>,
    /// Job id (`BLOCK_JOB_PENDING`).
    pub id: Option<String>,
    /// Job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub job_type: Option<String>,
    /// Maximum progress value.
    pub len: Option<u64>,
    /// Current progress value; equals `len` on success.
    pub offset: Option<u64>,
    /// Rate limit in bytes per second.
    pub speed: Option<u64>,
    /// Error message; present only when the job failed.
    pub error: Option<String>,
    /// I/O operation that failed, `read` or `write` (`BLOCK_JOB_ERROR`).
    pub operation: Option<String>,
    /// Action taken on the error, e.g. `report` (`BLOCK_JOB_ERROR`).
    pub action: Option<String>,
}

impl BlockJobEvent {
    /// The job id, whichever field carries it.
    pub fn job_id(&self) -> Option<&str> {
        self.id.as_deref().or(self.device.as_deref())
    }
}

/// One entry of `query-jobs` (QAPI `JobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type, e.g. `backup`, `create`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Current status.
    pub status: JobStatus,
    /// Progress so far, in units only meaningful relative to `total_progress`.
    pub current_progress: u64,
    /// Estimated progress value at completion.
    pub total_progress: u64,
    /// Present when the job failed.
    pub error: Option<String>,
}

/// A dirty bitmap on a node (QAPI `BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDirtyInfo {
    /// Bitmap name; empty for an anonymous bitmap (QEMU omits the name).
    #[serde(default)]
    pub name: String,
    /// Number of dirty bytes.
    pub count: u64,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Whether it records new writes.
    #[serde(default)]
    pub recording: bool,
    /// Whether an operation (job, NBD export) is using it.
    #[serde(default)]
    pub busy: bool,
    /// Whether it is stored in the image.
    #[serde(default)]
    pub persistent: bool,
    /// A persistent bitmap that was not stored properly and cannot be used.
    #[serde(default)]
    pub inconsistent: bool,
}

/// Image information of a node (QAPI `ImageInfo`, the fields capture uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// File name, or a `json:{...}` description for nodes without one.
    pub filename: String,
    /// Format (driver) name.
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host.
    pub actual_size: Option<u64>,
    /// Cluster size of formats that have one.
    pub cluster_size: Option<u64>,
    /// Whether the image is marked dirty.
    pub dirty_flag: Option<bool>,
    /// Backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// Format-specific details, raw.
    pub format_specific: Option<Value>,
}

/// A block node (QAPI `BlockDeviceInfo`): an entry of
/// `query-named-block-nodes` and the `inserted` medium of `query-block`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    /// Node name; empty if QEMU did not report one.
    #[serde(default)]
    pub node_name: String,
    /// Driver, e.g. `qcow2`, `file`, `null-co`.
    pub drv: String,
    /// File name of the node.
    pub file: String,
    /// Whether the node is read-only.
    #[serde(default)]
    pub ro: bool,
    /// Backing file name.
    #[serde(rename = "backing_file")]
    pub backing_file: Option<String>,
    /// Number of files in the backing chain.
    #[serde(rename = "backing_file_depth", default)]
    pub backing_file_depth: u64,
    /// Image information.
    pub image: ImageInfo,
    /// Dirty bitmaps on this node.
    pub dirty_bitmaps: Option<Vec<BlockDirtyInfo>>,
}

/// A guest block device (QAPI `BlockInfo`), an entry of `query-block`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInfo {
    /// Device (BlockBackend) name; may be empty for `-blockdev` setups.
    pub device: String,
    /// qdev id or QOM path of the guest device.
    pub qdev: Option<String>,
    /// Whether the device supports removable media.
    #[serde(default)]
    pub removable: bool,
    /// Whether the guest locked the media.
    #[serde(default)]
    pub locked: bool,
    /// Whether the tray is open (only devices with a tray).
    #[serde(rename = "tray_open")]
    pub tray_open: Option<bool>,
    /// I/O status, e.g. `ok`, `failed`, `nospace`.
    pub io_status: Option<String>,
    /// The medium, if one is inserted.
    pub inserted: Option<BlockDeviceInfo>,
    /// Dirty bitmaps at device level (QEMU before 6.0; newer ones report
    /// them in `inserted`).
    pub dirty_bitmaps: Option<Vec<BlockDirtyInfo>>,
}

/// `sync` mode of a backup job (QAPI `MirrorSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Copy the whole disk.
    Full,
    /// Copy what the top image allocates.
    Top,
    /// Copy only what is about to be overwritten (copy-before-write).
    None,
    /// Copy what the bitmap marks.
    Bitmap,
    /// Copy what the bitmap marks (older spelling of `Bitmap` with
    /// on-success bitmap mode).
    Incremental,
}

impl SyncMode {
    /// QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::None => "none",
            SyncMode::Bitmap => "bitmap",
            SyncMode::Incremental => "incremental",
        }
    }
}

/// What happens to the bitmap of a backup job (QAPI `BitmapSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapSyncMode {
    /// Cleared of the copied bits only if the job succeeds.
    OnSuccess,
    /// Left alone.
    Never,
    /// Cleared of the copied bits whatever the outcome.
    Always,
}

impl BitmapSyncMode {
    /// QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapSyncMode::OnSuccess => "on-success",
            BitmapSyncMode::Never => "never",
            BitmapSyncMode::Always => "always",
        }
    }
}

/// Arguments of `blockdev-backup`. Build with [`BlockdevBackup::new`] and
/// struct update syntax; arguments only some QEMU versions know (such as
/// `discard-source` since 9.1) go into `extra`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevBackup {
    /// Job id.
    pub job_id: String,
    /// Source node (or device) name.
    pub device: String,
    /// Target node name.
    pub target: String,
    /// What to copy.
    pub sync: SyncMode,
    /// Bitmap to copy from (sync `bitmap`/`incremental`) or to sync.
    pub bitmap: Option<String>,
    /// What happens to `bitmap`; required by QEMU when `bitmap` is set.
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Rate limit in bytes per second (0 or unset: unlimited).
    pub speed: Option<u64>,
    /// Whether the job finalizes by itself (QEMU default: true).
    pub auto_finalize: Option<bool>,
    /// Whether the job disappears when concluded (QEMU default: true).
    pub auto_dismiss: Option<bool>,
    /// Name for the copy-before-write filter node the job inserts.
    pub filter_node_name: Option<String>,
    /// Error action on the source, e.g. `report`, `stop`.
    pub on_source_error: Option<String>,
    /// Error action on the target, e.g. `report`, `stop`.
    pub on_target_error: Option<String>,
    /// Further arguments passed as they are.
    pub extra: Map<String, Value>,
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
            on_source_error: None,
            on_target_error: None,
            extra: Map::new(),
        }
    }

    /// The QMP arguments object.
    pub fn arguments(&self) -> Value {
        let mut args = Map::new();
        args.insert("job-id".into(), self.job_id.clone().into());
        args.insert("device".into(), self.device.clone().into());
        args.insert("target".into(), self.target.clone().into());
        args.insert("sync".into(), self.sync.as_str().into());
        let optional = [
            ("bitmap", self.bitmap.clone().map(Value::from)),
            ("bitmap-mode", self.bitmap_mode.map(|m| m.as_str().into())),
            ("speed", self.speed.map(Value::from)),
            ("auto-finalize", self.auto_finalize.map(Value::from)),
            ("auto-dismiss", self.auto_dismiss.map(Value::from)),
            (
                "filter-node-name",
                self.filter_node_name.clone().map(Value::from),
            ),
            (
                "on-source-error",
                self.on_source_error.clone().map(Value::from),
            ),
            (
                "on-target-error",
                self.on_target_error.clone().map(Value::from),
            ),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                args.insert(key.into(), value);
            }
        }
        args.extend(self.extra.clone());
        Value::Object(args)
    }
}

/// Arguments of `block-dirty-bitmap-add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmapAdd {
    /// Node the bitmap tracks.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    /// Granularity in bytes (QEMU default: 64 KiB or the cluster size).
    pub granularity: Option<u32>,
    /// Whether to store it in the image (qcow2 only; default false).
    pub persistent: Option<bool>,
    /// Whether it starts disabled (not recording; default false).
    pub disabled: Option<bool>,
}

impl DirtyBitmapAdd {
    /// A bitmap with QEMU's defaults.
    pub fn new(node: &str, name: &str) -> Self {
        DirtyBitmapAdd {
            node: node.to_owned(),
            name: name.to_owned(),
            granularity: None,
            persistent: None,
            disabled: None,
        }
    }

    /// The QMP arguments object.
    pub fn arguments(&self) -> Value {
        let mut args = Map::new();
        args.insert("node".into(), self.node.clone().into());
        args.insert("name".into(), self.name.clone().into());
        if let Some(granularity) = self.granularity {
            args.insert("granularity".into(), granularity.into());
        }
        if let Some(persistent) = self.persistent {
            args.insert("persistent".into(), persistent.into());
        }
        if let Some(disabled) = self.disabled {
            args.insert("disabled".into(), disabled.into());
        }
        Value::Object(args)
    }
}

/// Builders for the actions of a `transaction`.
pub mod action {
    use super::{bitmap_arguments, merge_arguments, BlockdevBackup, DirtyBitmapAdd};
    use serde_json::{json, Value};

    /// Any action: `{"type": kind, "data": data}`.
    pub fn custom(kind: &str, data: Value) -> Value {
        json!({ "type": kind, "data": data })
    }

    /// Starts a `blockdev-backup` job.
    pub fn blockdev_backup(backup: &BlockdevBackup) -> Value {
        custom("blockdev-backup", backup.arguments())
    }

    /// Adds a dirty bitmap.
    pub fn block_dirty_bitmap_add(bitmap: &DirtyBitmapAdd) -> Value {
        custom("block-dirty-bitmap-add", bitmap.arguments())
    }

    /// Removes a dirty bitmap.
    pub fn block_dirty_bitmap_remove(node: &str, name: &str) -> Value {
        custom("block-dirty-bitmap-remove", bitmap_arguments(node, name))
    }

    /// Clears a dirty bitmap.
    pub fn block_dirty_bitmap_clear(node: &str, name: &str) -> Value {
        custom("block-dirty-bitmap-clear", bitmap_arguments(node, name))
    }

    /// Enables a dirty bitmap.
    pub fn block_dirty_bitmap_enable(node: &str, name: &str) -> Value {
        custom("block-dirty-bitmap-enable", bitmap_arguments(node, name))
    }

    /// Disables a dirty bitmap.
    pub fn block_dirty_bitmap_disable(node: &str, name: &str) -> Value {
        custom("block-dirty-bitmap-disable", bitmap_arguments(node, name))
    }

    /// Merges bitmaps `sources` of `node` into its bitmap `target`.
    pub fn block_dirty_bitmap_merge(node: &str, target: &str, sources: &[&str]) -> Value {
        custom(
            "block-dirty-bitmap-merge",
            merge_arguments(node, target, sources),
        )
    }
}

fn bitmap_arguments(node: &str, name: &str) -> Value {
    json!({ "node": node, "name": name })
}

fn merge_arguments(node: &str, target: &str, sources: &[&str]) -> Value {
    json!({ "node": node, "target": target, "bitmaps": sources })
}

/// The error object of a failed command.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CommandError {
    class: String,
    desc: String,
}

impl CommandError {
    /// Reads `{"class": ..., "desc": ...}`, tolerating other shapes.
    fn from_value(error: &Value) -> Self {
        let field = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_owned);
        CommandError {
            class: field("class").unwrap_or_else(|| "Unknown".to_owned()),
            desc: field("desc").unwrap_or_else(|| "QEMU gave no description".to_owned()),
        }
    }
}

type Reply = std::result::Result<Value, CommandError>;

/// One line from QEMU, classified.
#[derive(Debug, Clone, PartialEq)]
enum Message {
    /// The greeting sent on connect.
    Greeting(Greeting),
    /// The reply to the command with this id.
    Reply { id: u64, reply: Reply },
    /// An asynchronous event.
    Event(Event),
    /// Anything else; the text says why it cannot be used.
    Ignored(String),
}

#[derive(Deserialize)]
struct RawGreeting {
    version: RawVersion,
    #[serde(default)]
    capabilities: Vec<Value>,
}

#[derive(Deserialize)]
struct RawVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

/// Classifies one line (without its newline) received from QEMU.
fn parse_message(line: &[u8]) -> Message {
    let value: Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(e) => return Message::Ignored(format!("not JSON: {e}")),
    };
    let Value::Object(mut object) = value else {
        return Message::Ignored("not a JSON object".to_owned());
    };
    if let Some(greeting) = object.get("QMP") {
        return match RawGreeting::deserialize(greeting) {
            Ok(raw) => Message::Greeting(Greeting {
                version: raw.version.qemu,
                package: raw.version.package,
                capabilities: raw
                    .capabilities
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
            }),
            Err(e) => Message::Ignored(format!("unreadable greeting: {e}")),
        };
    }
    if let Some(name) = object.get("event") {
        let Some(name) = name.as_str().map(str::to_owned) else {
            return Message::Ignored("event name is not a string".to_owned());
        };
        let timestamp = object
            .get("timestamp")
            .and_then(|t| Timestamp::deserialize(t).ok());
        let data = object.remove("data").unwrap_or(Value::Null);
        return Message::Event(Event {
            name,
            data,
            timestamp,
        });
    }
    let reply = if let Some(value) = object.remove("return") {
        Ok(value)
    } else if let Some(error) = object.get("error") {
        Err(CommandError::from_value(error))
    } else {
        return Message::Ignored("neither a greeting, an event nor a reply".to_owned());
    };
    match object.get("id").map(Value::as_u64) {
        Some(Some(id)) => Message::Reply { id, reply },
        Some(None) => Message::Ignored("reply with an id this client never sends".to_owned()),
        None => Message::Ignored(match reply {
            Ok(_) => "reply without an id".to_owned(),
            Err(e) => format!("error without an id: {}: {}", e.class, e.desc),
        }),
    }
}

/// Reads one `\n`-terminated line into `line`, without the newline.
/// Returns `Ok(false)` at the end of the stream (a final unterminated
/// line is dropped); a line longer than `max` bytes is an error.
fn read_line_bounded<R: BufRead>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<bool> {
    line.clear();
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(false);
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if line.len() + chunk.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("QEMU sent a line longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(chunk);
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            return Ok(true);
        }
    }
}

/// What the reader thread and the callers share.
#[derive(Debug, Default)]
struct State {
    /// Commands in flight by id; `Some` once the reply arrived.
    waiting: HashMap<u64, Option<Reply>>,
    /// Events nobody has taken yet, oldest first, with their size as received.
    events: VecDeque<(Event, usize)>,
    /// Sum of the sizes in `events`.
    event_bytes: usize,
    /// Events dropped because the queue was full.
    dropped_events: u64,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

impl State {
    /// Files one message (`bytes` long as received); returns whether
    /// waiting callers should look.
    fn deliver(&mut self, message: Message, bytes: usize) -> bool {
        match message {
            Message::Reply { id, reply } => match self.waiting.get_mut(&id) {
                Some(slot) if slot.is_none() => {
                    *slot = Some(reply);
                    true
                }
                // Unknown id (the caller gave up) or a second reply.
                _ => false,
            },
            Message::Event(event) => {
                self.push_event(event, bytes);
                true
            }
            Message::Greeting(_) | Message::Ignored(_) => false,
        }
    }

    /// Queue an event `bytes` long as received, dropping the oldest past
    /// [`MAX_PENDING_EVENTS`] or [`MAX_PENDING_EVENT_BYTES`].
    fn push_event(&mut self, event: Event, bytes: usize) {
        while self.events.len() >= MAX_PENDING_EVENTS
            || (!self.events.is_empty() && self.event_bytes + bytes > MAX_PENDING_EVENT_BYTES)
        {
            if let Some((_, old)) = self.events.pop_front() {
                self.event_bytes -= old;
                self.dropped_events += 1;
            }
        }
        self.event_bytes += bytes;
        self.events.push_back((event, bytes));
    }

    fn take_event(&mut self, matches: &mut dyn FnMut(&Event) -> bool) -> Option<Event> {
        let index = self.events.iter().position(|(e, _)| matches(e))?;
        let (event, bytes) = self.events.remove(index)?;
        self.event_bytes -= bytes;
        Some(event)
    }

    fn drain_events(&mut self) -> Vec<Event> {
        self.event_bytes = 0;
        self.events.drain(..).map(|(e, _)| e).collect()
    }

    fn close(&mut self, reason: String) {
        if self.closed.is_none() {
            self.closed = Some(reason);
        }
    }

    fn disconnected(&self) -> Option<Error> {
        self.closed.as_ref().map(|reason| Error::Disconnected {
            reason: reason.clone(),
        })
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deliver(&self, message: Message, bytes: usize) {
        if self.lock().deliver(message, bytes) {
            self.changed.notify_all();
        }
    }

    fn close(&self, reason: String) {
        self.lock().close(reason);
        self.changed.notify_all();
    }

    /// Waits for a change until `deadline`; `Err` once the deadline passed.
    fn wait_until<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> std::result::Result<MutexGuard<'a, State>, MutexGuard<'a, State>> {
        match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(self
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0),
            _ => Err(guard),
        }
    }
}

/// `now + timeout`, saturating at a year for absurd timeouts.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Reader thread: files every line until the connection ends.
fn read_loop(mut reader: BufReader<UnixStream>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    let reason = loop {
        match read_line_bounded(&mut reader, &mut line, MAX_LINE_LEN) {
            Ok(true) => shared.deliver(parse_message(&line), line.len()),
            Ok(false) => break "QEMU closed the monitor connection".to_owned(),
            Err(e) => break format!("reading from QEMU failed: {e}"),
        }
    };
    // Already closed or not, make sure neither side keeps using it.
    let _ = reader.get_ref().shutdown(Shutdown::Both);
    shared.close(reason);
}

/// A QMP connection. All methods take `&self` and may be called from
/// several threads at once.
#[derive(Debug)]
pub struct Qmp {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    greeting: Greeting,
    command_timeout: Duration,
    reader: Option<JoinHandle<()>>,
}

impl Qmp {
    /// Connects to the monitor socket at `path`, reads the greeting and
    /// negotiates capabilities (none are enabled).
    pub fn connect(path: &Path) -> Result<Qmp> {
        let connect_error = |source| Error::Connect {
            path: path.to_owned(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_error)?;
        Qmp::from_stream(stream, path)
    }

    /// Like [`Qmp::connect`], over a stream already connected to QEMU's
    /// monitor (`path` names it in messages).
    pub fn from_stream(stream: UnixStream, path: &Path) -> Result<Qmp> {
        let connect_error = |source| Error::Connect {
            path: path.to_owned(),
            source,
        };
        stream
            .set_read_timeout(Some(GREETING_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
            .map_err(connect_error)?;
        let mut reader = BufReader::new(stream.try_clone().map_err(connect_error)?);

        let mut state = State::default();
        let greeting = read_greeting(&mut reader, &mut state)?;
        stream.set_read_timeout(None).map_err(connect_error)?;

        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
        });
        let reader_shared = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_loop(reader, reader_shared))
            .map_err(connect_error)?;

        let qmp = Qmp {
            writer: Mutex::new(stream),
            shared,
            next_id: AtomicU64::new(1),
            greeting,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            reader: Some(reader),
        };
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// QEMU version from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.greeting.version
    }

    /// The whole greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Timeout used by [`Qmp::execute`] and the typed wrappers.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// Sets the timeout used by [`Qmp::execute`] and the typed wrappers.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().closed.is_none()
    }

    /// Runs `command` and returns its `return` value. Pass `Value::Null`
    /// for a command without arguments, otherwise a JSON object.
    pub fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.execute_timeout(command, arguments, self.command_timeout)
    }

    /// Like [`Qmp::execute`], decoding the reply into `T`.
    pub fn execute_as<T: DeserializeOwned>(&self, command: &str, arguments: Value) -> Result<T> {
        let value = self.execute(command, arguments)?;
        T::deserialize(value).map_err(|source| Error::Decode {
            what: format!("reply to {command}"),
            source,
        })
    }

    /// Like [`Qmp::execute`] with its own timeout. A reply arriving after
    /// the timeout is discarded.
    pub fn execute_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = deadline_after(timeout);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = Map::new();
        request.insert("execute".into(), command.into());
        if !arguments.is_null() {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), id.into());
        let mut line = Value::Object(request).to_string().into_bytes();
        line.push(b'\n');

        {
            let mut state = self.shared.lock();
            if let Some(e) = state.disconnected() {
                return Err(e);
            }
            state.waiting.insert(id, None);
        }
        if let Err(e) = self.send(&line) {
            self.shared.lock().waiting.remove(&id);
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
                    command: command.to_owned(),
                    timeout: WRITE_TIMEOUT,
                },
                _ => self
                    .shared
                    .lock()
                    .disconnected()
                    .unwrap_or(Error::Disconnected {
                        reason: format!("writing to QEMU failed: {e}"),
                    }),
            });
        }

        let mut state = self.shared.lock();
        loop {
            if let Some(reply) = state.waiting.get_mut(&id).and_then(Option::take) {
                state.waiting.remove(&id);
                return reply.map_err(|e| Error::Command {
                    command: command.to_owned(),
                    class: e.class,
                    desc: e.desc,
                });
            }
            if let Some(e) = state.disconnected() {
                state.waiting.remove(&id);
                return Err(e);
            }
            state = match self.shared.wait_until(state, deadline) {
                Ok(state) => state,
                Err(mut state) => {
                    state.waiting.remove(&id);
                    return Err(Error::Timeout {
                        command: command.to_owned(),
                        timeout,
                    });
                }
            };
        }
    }

    /// Writes one request line; on failure the connection is given up,
    /// since a partly written line leaves the stream unusable.
    fn send(&self, line: &[u8]) -> io::Result<()> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let result = writer.write_all(line).and_then(|()| writer.flush());
        if let Err(e) = &result {
            let _ = writer.shutdown(Shutdown::Both);
            self.shared.close(format!("writing to QEMU failed: {e}"));
        }
        result
    }

    /// Takes the oldest pending event, waiting up to `timeout` for one.
    /// `Ok(None)` on timeout; [`Error::Disconnected`] once the connection
    /// is gone and no events are left.
    pub fn next_event(&self, timeout: Duration) -> Result<Option<Event>> {
        match self.wait_event(timeout, |_| true) {
            Ok(event) => Ok(Some(event)),
            Err(Error::EventTimeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes the oldest pending event for which `matches` returns true,
    /// waiting up to `timeout`. Events that do not match stay queued for
    /// later calls. `matches` runs with the queue locked, so it must not
    /// call back into this client.
    pub fn wait_event(
        &self,
        timeout: Duration,
        mut matches: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = deadline_after(timeout);
        let mut state = self.shared.lock();
        loop {
            if let Some(event) = state.take_event(&mut matches) {
                return Ok(event);
            }
            if let Some(e) = state.disconnected() {
                return Err(e);
            }
            state = self
                .shared
                .wait_until(state, deadline)
                .map_err(|_| Error::EventTimeout { timeout })?;
        }
    }

    /// Takes all pending events, oldest first, without waiting.
    pub fn drain_events(&self) -> Vec<Event> {
        self.shared.lock().drain_events()
    }

    /// Number of events dropped because nobody took them and the queue
    /// reached [`MAX_PENDING_EVENTS`] or [`MAX_PENDING_EVENT_BYTES`].
    pub fn dropped_events(&self) -> u64 {
        self.shared.lock().dropped_events
    }

    /// `query-block`: the guest block devices.
    pub fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.execute_as("query-block", Value::Null)
    }

    /// `query-named-block-nodes` with `flat: true`: every named node.
    pub fn query_named_block_nodes(&self) -> Result<Vec<BlockDeviceInfo>> {
        self.execute_as("query-named-block-nodes", json!({ "flat": true }))
    }

    /// `query-jobs`: every job that has not been dismissed.
    pub fn query_jobs(&self) -> Result<Vec<JobInfo>> {
        self.execute_as("query-jobs", Value::Null)
    }

    /// `blockdev-add` with the given options object (a `BlockdevOptions`).
    pub fn blockdev_add(&self, options: Value) -> Result<()> {
        self.execute("blockdev-add", options).map(drop)
    }

    /// `blockdev-del` of the node `node_name`.
    pub fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.execute("blockdev-del", json!({ "node-name": node_name }))
            .map(drop)
    }

    /// `blockdev-backup`: starts a backup job outside a transaction.
    pub fn blockdev_backup(&self, backup: &BlockdevBackup) -> Result<()> {
        self.execute("blockdev-backup", backup.arguments())
            .map(drop)
    }

    /// `transaction` of the given [`action`]s: all take effect or none.
    pub fn transaction(&self, actions: Vec<Value>) -> Result<()> {
        self.execute("transaction", json!({ "actions": actions }))
            .map(drop)
    }

    /// `transaction` with `completion-mode: grouped`: if one job started
    /// by the transaction fails, QEMU cancels the others.
    pub fn transaction_grouped(&self, actions: Vec<Value>) -> Result<()> {
        let arguments = json!({
            "actions": actions,
            "properties": { "completion-mode": "grouped" },
        });
        self.execute("transaction", arguments).map(drop)
    }

    /// `job-finalize`: lets a pending job make its graph changes.
    pub fn job_finalize(&self, id: &str) -> Result<()> {
        self.execute("job-finalize", json!({ "id": id })).map(drop)
    }

    /// `job-dismiss`: removes a concluded job.
    pub fn job_dismiss(&self, id: &str) -> Result<()> {
        self.execute("job-dismiss", json!({ "id": id })).map(drop)
    }

    /// `job-cancel`: asks a job to stop; it concludes with an error.
    pub fn job_cancel(&self, id: &str) -> Result<()> {
        self.execute("job-cancel", json!({ "id": id })).map(drop)
    }

    /// `block-dirty-bitmap-add`.
    pub fn block_dirty_bitmap_add(&self, bitmap: &DirtyBitmapAdd) -> Result<()> {
        self.execute("block-dirty-bitmap-add", bitmap.arguments())
            .map(drop)
    }

    /// `block-dirty-bitmap-remove`.
    pub fn block_dirty_bitmap_remove(&self, node: &str, name: &str) -> Result<()> {
        self.execute("block-dirty-bitmap-remove", bitmap_arguments(node, name))
            .map(drop)
    }

    /// `block-dirty-bitmap-clear`: marks everything clean.
    pub fn block_dirty_bitmap_clear(&self, node: &str, name: &str) -> Result<()> {
        self.execute("block-dirty-bitmap-clear", bitmap_arguments(node, name))
            .map(drop)
    }

    /// `block-dirty-bitmap-enable`: starts recording writes.
    pub fn block_dirty_bitmap_enable(&self, node: &str, name: &str) -> Result<()> {
        self.execute("block-dirty-bitmap-enable", bitmap_arguments(node, name))
            .map(drop)
    }

    /// `block-dirty-bitmap-disable`: stops recording writes.
    pub fn block_dirty_bitmap_disable(&self, node: &str, name: &str) -> Result<()> {
        self.execute("block-dirty-bitmap-disable", bitmap_arguments(node, name))
            .map(drop)
    }

    /// `block-dirty-bitmap-merge` of bitmaps `sources` of `node` into its
    /// bitmap `target` (bitmaps on other nodes: use [`Qmp::execute`]).
    pub fn block_dirty_bitmap_merge(
        &self,
        node: &str,
        target: &str,
        sources: &[&str],
    ) -> Result<()> {
        self.execute(
            "block-dirty-bitmap-merge",
            merge_arguments(node, target, sources),
        )
        .map(drop)
    }
}

impl Qmp {
    /// Wait until none of the jobs `ids` is running any more (each has
    /// concluded or is gone). `Ok(false)` if some still run after `limit`.
    pub fn wait_jobs_concluded(&self, ids: &[String], limit: Duration) -> Result<bool> {
        let deadline = deadline_after(limit);
        loop {
            let jobs = self.query_jobs()?;
            let running = jobs
                .iter()
                .any(|j| ids.contains(&j.id) && j.status != JobStatus::Concluded);
            if !running {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            let _ = self.next_event(Duration::from_millis(50))?;
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let _ = writer.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Reads lines until the greeting, queueing events that come first in `state`.
fn read_greeting<R: BufRead>(reader: &mut R, state: &mut State) -> Result<Greeting> {
    let deadline = deadline_after(GREETING_TIMEOUT);
    let mut line = Vec::new();
    loop {
        match read_line_bounded(reader, &mut line, MAX_LINE_LEN) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::Disconnected {
                    reason: "QEMU closed the monitor connection before its greeting".to_owned(),
                })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(greeting_timeout());
            }
            Err(e) => {
                return Err(Error::Disconnected {
                    reason: format!("reading the QMP greeting failed: {e}"),
                })
            }
        }
        match parse_message(&line) {
            Message::Greeting(greeting) => return Ok(greeting),
            Message::Event(event) => state.push_event(event, line.len()),
            Message::Reply { .. } => {
                return Err(Error::Protocol(
                    "QEMU sent a reply before its greeting".to_owned(),
                ))
            }
            Message::Ignored(why) => {
                return Err(Error::Protocol(format!(
                    "expected a QMP greeting, got a line that is {why}"
                )))
            }
        }
        if Instant::now() >= deadline {
            return Err(greeting_timeout());
        }
    }
}

fn greeting_timeout() -> Error {
    Error::Protocol(format!(
        "no QMP greeting within {GREETING_TIMEOUT:?} (is another client connected to this monitor?)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::os::unix::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}"#;

    fn parse(line: &str) -> Message {
        parse_message(line.as_bytes())
    }

    fn is_ignored(message: &Message) -> bool {
        matches!(message, Message::Ignored(_))
    }

    #[test]
    fn parses_greeting() {
        let Message::Greeting(greeting) = parse(GREETING) else {
            panic!("not a greeting");
        };
        assert_eq!(greeting.version, QemuVersion::new(10, 0, 2));
        assert_eq!(greeting.version.to_string(), "10.0.2");
        assert!(greeting.version >= QemuVersion::new(9, 1, 0));
        assert!(greeting.version < QemuVersion::new(10, 1, 0));
        assert_eq!(greeting.package, "Debian 1:10.0.2+ds-2");
        assert_eq!(greeting.capabilities, vec!["oob".to_owned()]);
    }

    #[test]
    fn rejects_malformed_greetings() {
        for line in [
            r#"{"QMP": {}}"#,
            r#"{"QMP": null}"#,
            r#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0}}}}"#,
            r#"{"QMP": {"version": {"qemu": {"major": -1, "minor": 0, "micro": 0}}}}"#,
            r#"{"QMP": {"version": {"qemu": {"major": 99999999999, "minor": 0, "micro": 0}}}}"#,
            r#"{"QMP": {"version": {"qemu": {"major": "10", "minor": 0, "micro": 0}}}}"#,
            r#"{"QMP": {"version": {"qemu": {"major": 1e300, "minor": 0, "micro": 0}}}}"#,
        ] {
            assert!(is_ignored(&parse(line)), "{line}");
        }
        // Odd capabilities are skipped, not fatal.
        let line = r#"{"QMP": {"version": {"qemu": {"major": 1, "minor": 2, "micro": 3}}, "capabilities": [1, "oob", null]}}"#;
        let Message::Greeting(greeting) = parse(line) else {
            panic!("not a greeting");
        };
        assert_eq!(greeting.capabilities, vec!["oob".to_owned()]);
        assert_eq!(greeting.package, "");
    }

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse(r#"{"return": {}, "id": 1}"#),
            Message::Reply {
                id: 1,
                reply: Ok(json!({}))
            }
        );
        assert_eq!(
            parse(
                r#"{"id": 7, "error": {"class": "GenericError", "desc": "Failed to find node"}}"#
            ),
            Message::Reply {
                id: 7,
                reply: Err(CommandError {
                    class: "GenericError".into(),
                    desc: "Failed to find node".into()
                })
            }
        );
        // An error object of the wrong shape still reaches the caller.
        let Message::Reply {
            id: 3,
            reply: Err(e),
        } = parse(r#"{"id": 3, "error": [1, 2]}"#)
        else {
            panic!("not routed");
        };
        assert_eq!(e.class, "Unknown");
        let Message::Reply { reply: Err(e), .. } =
            parse(r#"{"id": 3, "error": {"class": 5, "desc": {"a": 1}}}"#)
        else {
            panic!("not routed");
        };
        assert_eq!(e.class, "Unknown");
        // `return` wins if a broken peer sends both.
        assert!(matches!(
            parse(r#"{"id": 4, "return": 5, "error": {}}"#),
            Message::Reply {
                id: 4,
                reply: Ok(_)
            }
        ));
        // Large but valid id.
        assert!(matches!(
            parse(r#"{"return": null, "id": 18446744073709551615}"#),
            Message::Reply {
                id: u64::MAX,
                reply: Ok(Value::Null)
            }
        ));
    }

    #[test]
    fn ignores_replies_without_usable_id() {
        for line in [
            r#"{"return": {}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#,
            r#"{"return": {}, "id": "abc"}"#,
            r#"{"return": {}, "id": -1}"#,
            r#"{"return": {}, "id": 1.5}"#,
            r#"{"return": {}, "id": 1.2345678901234568e+29}"#,
            r#"{"return": {}, "id": 123456789012345678901234567890}"#,
            r#"{"return": {}, "id": {"a": [1, 2]}}"#,
            r#"{"return": {}, "id": null}"#,
            r#"{"id": 1}"#,
            r#"{}"#,
        ] {
            assert!(is_ignored(&parse(line)), "{line}");
        }
    }

    #[test]
    fn parses_events() {
        let line = r#"{"timestamp": {"seconds": 1795606666, "microseconds": 744626}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j0"}}"#;
        let Message::Event(event) = parse(line) else {
            panic!("not an event");
        };
        assert_eq!(event.name, Event::JOB_STATUS_CHANGE);
        assert_eq!(
            event.timestamp,
            Some(Timestamp {
                seconds: 1795606666,
                microseconds: 744626
            })
        );
        assert_eq!(
            event.job_status_change(),
            Some(JobStatusChange {
                id: "j0".into(),
                status: JobStatus::Created
            })
        );
        assert_eq!(event.block_job(), None);

        // No data, odd time stamp: still an event.
        let Message::Event(event) = parse(r#"{"event": "STOP", "timestamp": "now"}"#) else {
            panic!("not an event");
        };
        assert_eq!(event.data, Value::Null);
        assert_eq!(event.timestamp, None);
        assert_eq!(event.job_status_change(), None);

        // Wrong payload types decode to nothing instead of panicking.
        let Message::Event(event) = parse(r#"{"event": "JOB_STATUS_CHANGE", "data": {"id": 5}}"#)
        else {
            panic!("not an event");
        };
        assert_eq!(event.job_status_change(), None);
        assert!(matches!(
            event.data_as::<JobStatusChange>(),
            Err(Error::Decode { .. })
        ));

        for line in [r#"{"event": 5}"#, r#"{"event": null, "data": {}}"#] {
            assert!(is_ignored(&parse(line)), "{line}");
        }
    }

    #[test]
    fn decodes_block_job_events() {
        let completed: Event = Event {
            name: Event::BLOCK_JOB_COMPLETED.into(),
            data: json!({"device": "j0", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"}),
            timestamp: None,
        };
        let info = completed.block_job().expect("block job event");
        assert_eq!(info.job_id(), Some("j0"));
        assert_eq!(info.job_type.as_deref(), Some("backup"));
        assert_eq!(
            (info.len, info.offset, info.speed),
            (Some(64 << 20), Some(64 << 20), Some(0))
        );
        assert_eq!(info.error, None);

        let pending = Event {
            name: Event::BLOCK_JOB_PENDING.into(),
            data: json!({"type": "backup", "id": "j1"}),
            timestamp: None,
        };
        assert_eq!(
            pending
                .block_job()
                .and_then(|e| e.job_id().map(str::to_owned)),
            Some("j1".into())
        );

        let error = Event {
            name: Event::BLOCK_JOB_ERROR.into(),
            data: json!({"device": "j2", "operation": "write", "action": "report"}),
            timestamp: None,
        };
        let info = error.block_job().expect("block job event");
        assert_eq!(info.operation.as_deref(), Some("write"));
        assert_eq!(info.action.as_deref(), Some("report"));
    }

    #[test]
    fn ignores_garbage() {
        let deep = "[".repeat(100_000);
        let long_string = format!("\"{}\"", "x".repeat(1 << 20));
        let lines: Vec<&[u8]> = vec![
            b"",
            b"   ",
            b"\r",
            b"garbage",
            b"{\"return\": ",
            b"\xff\xfe\x00\x01",
            b"{\"return\": \"\xff\"}",
            b"[1, 2, 3]",
            b"42",
            b"1e999",
            b"null",
            b"\"QMP\"",
            b"{\"a\": 1} {\"b\": 2}",
            deep.as_bytes(),
            long_string.as_bytes(),
        ];
        for line in lines {
            assert!(
                is_ignored(&parse_message(line)),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        // A trailing carriage return is JSON whitespace.
        assert!(matches!(
            parse("{\"return\": {}, \"id\": 2}\r"),
            Message::Reply { id: 2, .. }
        ));
    }

    #[test]
    fn reads_bounded_lines() {
        let mut reader = BufReader::with_capacity(4, Cursor::new(b"ab\n\ncdefgh\nij".to_vec()));
        let mut line = Vec::new();
        assert!(read_line_bounded(&mut reader, &mut line, 100).unwrap());
        assert_eq!(line, b"ab");
        assert!(read_line_bounded(&mut reader, &mut line, 100).unwrap());
        assert_eq!(line, b"");
        assert!(read_line_bounded(&mut reader, &mut line, 6).unwrap());
        assert_eq!(line, b"cdefgh");
        // Unterminated last line: end of stream.
        assert!(!read_line_bounded(&mut reader, &mut line, 100).unwrap());
        assert!(!read_line_bounded(&mut reader, &mut line, 100).unwrap());

        let mut reader = BufReader::with_capacity(4, Cursor::new(b"0123456789\n".to_vec()));
        let err = read_line_bounded(&mut reader, &mut line, 9).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn routes_replies_only_to_waiting_ids() {
        let mut state = State::default();
        state.waiting.insert(5, None);
        // Unknown id: dropped.
        assert!(!state.deliver(parse(r#"{"return": 1, "id": 6}"#), 0));
        assert_eq!(state.waiting.len(), 1);
        assert!(state.deliver(parse(r#"{"return": 2, "id": 5}"#), 0));
        // A second reply for the same id does not replace the first.
        assert!(!state.deliver(parse(r#"{"return": 3, "id": 5}"#), 0));
        assert_eq!(state.waiting.get(&5), Some(&Some(Ok(json!(2)))));
        // Greetings and garbage change nothing.
        assert!(!state.deliver(parse(GREETING), 0));
        assert!(!state.deliver(parse("garbage"), 0));
        assert!(state.events.is_empty());
    }

    #[test]
    fn event_queue_is_bounded() {
        let mut state = State::default();
        for i in 0..MAX_PENDING_EVENTS + 3 {
            state.push_event(
                Event {
                    name: format!("E{i}"),
                    data: Value::Null,
                    timestamp: None,
                },
                20,
            );
        }
        assert_eq!(state.events.len(), MAX_PENDING_EVENTS);
        assert_eq!(state.dropped_events, 3);
        assert_eq!(state.events.front().map(|e| e.0.name.as_str()), Some("E3"));
        let taken = state.take_event(&mut |e| e.name == "E10").unwrap();
        assert_eq!(taken.name, "E10");
        assert_eq!(state.events.len(), MAX_PENDING_EVENTS - 1);
        assert_eq!(state.event_bytes, (MAX_PENDING_EVENTS - 1) * 20);
    }

    /// Unread events were bounded in number only: 65,536 events of 60 MiB
    /// each could pile up. Now their bytes are bounded too.
    #[test]
    fn event_queue_is_bounded_in_bytes() {
        let mut state = State::default();
        let big = MAX_PENDING_EVENT_BYTES / 4 + 1;
        for i in 0..10 {
            let event = Event {
                name: format!("E{i}"),
                data: Value::Null,
                timestamp: None,
            };
            state.push_event(event, big);
            assert!(state.event_bytes <= MAX_PENDING_EVENT_BYTES);
        }
        assert_eq!(state.events.len(), 3);
        assert_eq!(state.dropped_events, 7);
        assert_eq!(state.drain_events().len(), 3);
        assert_eq!(state.event_bytes, 0);
        // One event larger than the whole budget is still delivered.
        state.push_event(
            Event {
                name: "huge".into(),
                data: Value::Null,
                timestamp: None,
            },
            2 * MAX_PENDING_EVENT_BYTES,
        );
        assert_eq!(state.events.len(), 1);
    }

    /// Events before the greeting were kept without any bound; they now go
    /// into the same bounded queue.
    #[test]
    fn early_events_are_bounded() {
        let event = format!(
            r#"{{"event": "X", "data": {{"pad": "{}"}}}}"#,
            "x".repeat(1 << 20)
        );
        let mut text = String::new();
        for _ in 0..40 {
            text.push_str(&event);
            text.push('\n');
        }
        text.push_str(GREETING);
        text.push('\n');
        let mut state = State::default();
        let greeting = read_greeting(&mut Cursor::new(text.into_bytes()), &mut state).unwrap();
        assert_eq!(greeting.version, QemuVersion::new(10, 0, 2));
        assert!(state.event_bytes <= MAX_PENDING_EVENT_BYTES);
        assert_eq!(state.events.len() as u64 + state.dropped_events, 40);
        assert!(state.dropped_events > 0);
    }

    #[test]
    fn decodes_query_replies() {
        // Shapes as QEMU 10.0 sends them.
        let nodes = json!([{"iops_rd": 0, "detect_zeroes": "off", "active": true,
            "image": {"virtual-size": 67108864, "filename": "/tmp/a.qcow2", "cluster-size": 65536,
                      "format": "qcow2", "actual-size": 200704,
                      "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}, "dirty-flag": false},
            "iops_wr": 0, "ro": false, "node-name": "q0", "backing_file_depth": 0, "drv": "qcow2",
            "iops": 0, "bps_wr": 0, "write_threshold": 0,
            "dirty-bitmaps": [{"name": "b0", "recording": true, "persistent": false, "busy": false,
                               "granularity": 65536, "count": 0}],
            "encrypted": false, "bps": 0, "bps_rd": 0,
            "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/tmp/a.qcow2"}]);
        let nodes: Vec<BlockDeviceInfo> = serde_json::from_value(nodes).unwrap();
        assert_eq!(nodes[0].node_name, "q0");
        assert_eq!(nodes[0].drv, "qcow2");
        assert_eq!(nodes[0].image.virtual_size, 64 << 20);
        assert_eq!(nodes[0].image.cluster_size, Some(65536));
        let bitmaps = nodes[0].dirty_bitmaps.as_ref().unwrap();
        assert_eq!(bitmaps[0].name, "b0");
        assert!(bitmaps[0].recording && !bitmaps[0].persistent && !bitmaps[0].inconsistent);

        let block = json!([{"io-status": "ok", "device": "ide0-hd0", "locked": false, "removable": false,
            "qdev": "/machine/unattached/device[23]", "type": "unknown",
            "inserted": {"ro": false, "drv": "qcow2", "encrypted": false, "file": "disks/test.qcow2",
                         "node-name": "disk0", "backing_file_depth": 1, "backing_file": "base.qcow2",
                         "image": {"filename": "disks/test.qcow2", "format": "qcow2", "virtual-size": 2048000,
                                   "backing-filename": "base.qcow2"}}},
            {"device": "cd0", "locked": false, "removable": true, "tray_open": true, "type": "unknown"}]);
        let block: Vec<BlockInfo> = serde_json::from_value(block).unwrap();
        let inserted = block[0].inserted.as_ref().unwrap();
        assert_eq!(inserted.node_name, "disk0");
        assert_eq!(inserted.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(inserted.backing_file_depth, 1);
        assert_eq!(
            inserted.image.backing_filename.as_deref(),
            Some("base.qcow2")
        );
        assert_eq!(block[0].io_status.as_deref(), Some("ok"));
        assert_eq!(block[1].inserted, None);
        assert_eq!(block[1].tray_open, Some(true));

        let jobs = json!([{"current-progress": 1048576, "status": "running", "total-progress": 67108864,
                           "type": "backup", "id": "j1"},
                          {"current-progress": 0, "status": "some-future-state", "total-progress": 0,
                           "type": "backup", "id": "j2", "error": "boom"}]);
        let jobs: Vec<JobInfo> = serde_json::from_value(jobs).unwrap();
        assert_eq!(jobs[0].status, JobStatus::Running);
        assert_eq!(jobs[0].job_type, "backup");
        assert_eq!(jobs[0].current_progress, 1 << 20);
        assert_eq!(jobs[1].status, JobStatus::Unknown);
        assert_eq!(jobs[1].error.as_deref(), Some("boom"));
    }

    #[test]
    fn builds_arguments_and_actions() {
        let mut backup = BlockdevBackup {
            bitmap: Some("b0".into()),
            bitmap_mode: Some(BitmapSyncMode::OnSuccess),
            auto_finalize: Some(false),
            ..BlockdevBackup::new("j0", "drive0", "nbd0", SyncMode::Bitmap)
        };
        backup.extra.insert("discard-source".into(), json!(false));
        assert_eq!(
            action::blockdev_backup(&backup),
            json!({"type": "blockdev-backup", "data": {
                "job-id": "j0", "device": "drive0", "target": "nbd0", "sync": "bitmap",
                "bitmap": "b0", "bitmap-mode": "on-success", "auto-finalize": false,
                "discard-source": false}})
        );
        let bitmap = DirtyBitmapAdd {
            persistent: Some(false),
            ..DirtyBitmapAdd::new("drive0", "b1")
        };
        assert_eq!(
            action::block_dirty_bitmap_add(&bitmap),
            json!({"type": "block-dirty-bitmap-add",
                   "data": {"node": "drive0", "name": "b1", "persistent": false}})
        );
        assert_eq!(
            action::block_dirty_bitmap_merge("n", "t", &["a", "b"]),
            json!({"type": "block-dirty-bitmap-merge",
                   "data": {"node": "n", "target": "t", "bitmaps": ["a", "b"]}})
        );
        assert_eq!(
            action::block_dirty_bitmap_clear("n", "b"),
            json!({"type": "block-dirty-bitmap-clear", "data": {"node": "n", "name": "b"}})
        );
    }

    /// A scripted peer on a unix socket: sends the greeting, answers
    /// `qmp_capabilities`, then runs `script`.
    fn fake_qemu(
        before_greeting: &'static str,
        script: impl FnOnce(&mut BufReader<UnixStream>, &mut UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, Qmp, JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            stream.write_all(before_greeting.as_bytes()).unwrap();
            writeln!(stream, "{GREETING}").unwrap();
            let request = read_request(&mut reader);
            assert_eq!(request["execute"], "qmp_capabilities");
            writeln!(stream, r#"{{"return": {{}}, "id": {}}}"#, request["id"]).unwrap();
            script(&mut reader, &mut stream);
        });
        let qmp = Qmp::connect(&path).unwrap();
        (dir, qmp, server)
    }

    fn read_request(reader: &mut BufReader<UnixStream>) -> Value {
        let mut line = Vec::new();
        assert!(read_line_bounded(reader, &mut line, MAX_LINE_LEN).unwrap());
        serde_json::from_slice(&line).unwrap()
    }

    #[test]
    fn routes_out_of_order_replies_between_noise() {
        let (_dir, qmp, server) = fake_qemu(
            "{\"event\": \"EARLY\", \"data\": {}}\n",
            |reader, stream| {
                let first = read_request(reader);
                let second = read_request(reader);
                let (a, b) = if first["execute"] == "a" {
                    (first, second)
                } else {
                    (second, first)
                };
                assert_eq!(a["arguments"], json!({"x": 1}));
                assert_eq!(b.get("arguments"), None);
                let lines = [
                    "garbage".to_owned(),
                    r#"{"return": "stale", "id": 999999}"#.to_owned(),
                    r#"{"event": "MIDDLE", "data": {"n": 1}}"#.to_owned(),
                    r#"{"return": {}, "id": "b"}"#.to_owned(),
                    format!(
                        r#"{{"id": {}, "error": {{"class": "GenericError", "desc": "no b"}}}}"#,
                        b["id"]
                    ),
                    format!(r#"{{"return": "for a", "id": {}}}"#, a["id"]),
                ];
                for line in lines {
                    writeln!(stream, "{line}").unwrap();
                }
            },
        );
        std::thread::scope(|s| {
            let a = s.spawn(|| qmp.execute("a", json!({"x": 1})));
            let b = s.spawn(|| qmp.execute("b", Value::Null));
            assert_eq!(a.join().unwrap().unwrap(), json!("for a"));
            match b.join().unwrap() {
                Err(Error::Command {
                    command,
                    class,
                    desc,
                }) => {
                    assert_eq!(
                        (command.as_str(), class.as_str(), desc.as_str()),
                        ("b", "GenericError", "no b")
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        });
        server.join().unwrap();
        // The event sent before the greeting is kept, and order is preserved.
        let middle = qmp
            .wait_event(Duration::from_secs(5), |e| e.name == "MIDDLE")
            .unwrap();
        assert_eq!(middle.data, json!({"n": 1}));
        let early = qmp.next_event(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(early.name, "EARLY");
    }

    #[test]
    fn lost_connection_wakes_every_caller() {
        let (_dir, qmp, server) = fake_qemu("", |reader, stream| {
            let _ = read_request(reader);
            writeln!(stream, r#"{{"event": "LAST"}}"#).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            // Dropping the stream closes the connection with the command unanswered.
        });
        let started = Instant::now();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| qmp.wait_event(Duration::from_secs(60), |e| e.name == "NEVER"));
            let result = qmp.execute("hang", Value::Null);
            assert!(
                matches!(result, Err(Error::Disconnected { .. })),
                "{result:?}"
            );
            let waited = waiter.join().unwrap();
            assert!(
                matches!(waited, Err(Error::Disconnected { .. })),
                "{waited:?}"
            );
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        server.join().unwrap();
        assert!(!qmp.is_connected());
        // Queued events can still be read, then the loss is reported.
        assert_eq!(
            qmp.next_event(Duration::from_secs(1))
                .unwrap()
                .unwrap()
                .name,
            "LAST"
        );
        assert!(matches!(
            qmp.next_event(Duration::from_secs(1)),
            Err(Error::Disconnected { .. })
        ));
        assert!(matches!(
            qmp.execute("later", Value::Null),
            Err(Error::Disconnected { .. })
        ));
    }

    #[test]
    fn times_out_and_drops_late_reply() {
        let (_dir, qmp, server) = fake_qemu("", |reader, stream| {
            let slow = read_request(reader);
            let next = read_request(reader);
            writeln!(stream, r#"{{"return": "late", "id": {}}}"#, slow["id"]).unwrap();
            writeln!(stream, r#"{{"return": "fresh", "id": {}}}"#, next["id"]).unwrap();
            // Stay connected until the client hangs up.
            let mut line = Vec::new();
            while read_line_bounded(reader, &mut line, MAX_LINE_LEN).unwrap_or(false) {}
        });
        let result = qmp.execute_timeout("slow", Value::Null, Duration::from_millis(100));
        assert!(
            matches!(&result, Err(Error::Timeout { command, .. }) if command == "slow"),
            "{result:?}"
        );
        assert_eq!(qmp.execute("next", Value::Null).unwrap(), json!("fresh"));
        assert!(qmp.next_event(Duration::from_millis(10)).unwrap().is_none());
        assert!(matches!(
            qmp.wait_event(Duration::from_millis(10), |_| true),
            Err(Error::EventTimeout { .. })
        ));
        drop(qmp);
        server.join().unwrap();
    }

    #[test]
    fn rejects_peer_without_greeting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"hello\n").unwrap();
        });
        let result = Qmp::connect(&path);
        assert!(matches!(result, Err(Error::Protocol(_))), "{result:?}");
        server.join().unwrap();

        let result = Qmp::connect(&dir.path().join("missing.sock"));
        assert!(matches!(result, Err(Error::Connect { .. })), "{result:?}");
    }
}

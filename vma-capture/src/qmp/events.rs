//! Events QEMU sends on its own, and the payloads capture reads.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::{Error, JobStatus, Result};

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}

//! QMP client: commands, replies and events over a unix socket.
//!
//! - [`Qmp`] (in `client`) speaks the QEMU Machine Protocol with std
//!   threads only. A background reader thread reads newline-delimited JSON
//!   from the socket, each line bounded; every line is classified
//!   (greeting, reply, event or something to ignore) without I/O, so no
//!   byte sequence from QEMU can make the client panic. Replies are routed
//!   by their `id` to the thread waiting in [`Qmp::run`]; events go into a
//!   bounded queue that [`Qmp::next_event`] and [`Qmp::wait_event`] take
//!   from. When the connection is lost (QEMU exits or is killed) every
//!   waiting call and every later call returns [`Error::Disconnected`].
//! - [`Command`] (in `commands`): every command is a type whose value is
//!   its arguments, with its QMP name and reply type; [`Qmp::run`] runs
//!   any of them, and a [`Transaction`] takes any [`Action`] (a command
//!   QEMU can run inside `transaction`).
//! - `replies`: the typed replies of the queries ([`BlockInfo`],
//!   [`BlockDeviceInfo`], [`JobInfo`], ...).
//! - `events`: event payloads ([`JobStatusChange`], [`BlockJobEvent`]).
//!
//! The command and type names follow QEMU's QAPI schema
//! (`qapi/block-core.json`, `qapi/job.json`, `qapi/transaction.json`).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

mod client;
mod commands;
mod events;
mod replies;

pub use client::Qmp;
pub use commands::*;
pub use events::*;
pub use replies::*;

/// How long [`Qmp::run`] waits for a reply unless told otherwise.
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
    /// A command's arguments could not be put into JSON (a path that is
    /// not UTF-8, for example).
    #[error("cannot encode the arguments of QMP command {command}: {source}")]
    Encode {
        /// The command.
        command: String,
        /// Underlying error.
        source: serde_json::Error,
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

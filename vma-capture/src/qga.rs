//! QEMU guest agent client, for freezing the guest's file systems around
//! the moment a capture starts.
//!
//! The agent speaks JSON lines over a unix socket (virtio-serial on the
//! host side), without a greeting. A `guest-sync` with a fresh id first
//! skips whatever an earlier, interrupted client left unread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// How long one agent command may take (freezing waits for the guest to
/// flush its file systems).
const TIMEOUT: Duration = Duration::from_secs(60);
/// Longest line accepted from the agent.
const MAX_LINE: usize = 1 << 20;

/// What went wrong talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket failed or timed out.
    #[error("guest agent at {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("guest agent: {command} failed: {desc}")]
    Command {
        /// Command sent.
        command: String,
        /// The agent's description.
        desc: String,
    },
    /// The agent sent something that is not a reply.
    #[error("guest agent: unexpected reply to {command}: {line}")]
    Protocol {
        /// Command sent.
        command: String,
        /// What came back (shortened).
        line: String,
    },
}

/// A connection to a guest agent.
pub struct GuestAgent {
    path: String,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl GuestAgent {
    /// Connect and synchronise with the agent at `path`.
    pub fn connect(path: &Path) -> Result<GuestAgent, AgentError> {
        let name = path.display().to_string();
        let io = |source| AgentError::Io {
            path: name.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut agent = GuestAgent {
            path: name.clone(),
            writer: stream,
            reader,
        };
        let id = std::process::id() as u64 * 1000
            + (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_millis() as u64));
        agent.send("guest-sync", json!({ "id": id }))?;
        // Skip replies meant for someone else until ours arrives.
        loop {
            let reply = agent.read_reply("guest-sync")?;
            if reply.get("return") == Some(&json!(id)) {
                return Ok(agent);
            }
        }
    }

    /// Freeze the guest's file systems; returns how many were frozen.
    pub fn freeze(&mut self) -> Result<u64, AgentError> {
        self.call("guest-fsfreeze-freeze")
    }

    /// Thaw the guest's file systems; returns how many were thawed.
    pub fn thaw(&mut self) -> Result<u64, AgentError> {
        self.call("guest-fsfreeze-thaw")
    }

    fn call(&mut self, command: &str) -> Result<u64, AgentError> {
        self.send(command, Value::Null)?;
        let reply = self.read_reply(command)?;
        if let Some(err) = reply.get("error") {
            return Err(AgentError::Command {
                command: command.into(),
                desc: err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description")
                    .into(),
            });
        }
        reply
            .get("return")
            .and_then(Value::as_u64)
            .ok_or_else(|| AgentError::Protocol {
                command: command.into(),
                line: shorten(&reply.to_string()),
            })
    }

    fn send(&mut self, command: &str, arguments: Value) -> Result<(), AgentError> {
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| AgentError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The next JSON object from the agent (blank lines and the 0xFF
    /// delimiter byte of `guest-sync-delimited` are skipped).
    fn read_reply(&mut self, command: &str) -> Result<Value, AgentError> {
        loop {
            let mut line = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .map_err(|source| AgentError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(AgentError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the agent closed the connection",
                    ),
                });
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{FFFD}');
            if text.is_empty() {
                continue;
            }
            return match serde_json::from_str::<Value>(text) {
                Ok(v) if v.is_object() => Ok(v),
                _ => Err(AgentError::Protocol {
                    command: command.into(),
                    line: shorten(text),
                }),
            };
        }
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(200).collect()
}

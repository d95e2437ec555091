//! The connection: requests out, replies and events in.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    Command, Error, Event, JobCancel, JobStatus, QemuVersion, QmpCapabilities, QueryJobs, Result,
    Timestamp, VersionInfo, DEFAULT_COMMAND_TIMEOUT, GREETING_TIMEOUT, MAX_LINE_LEN,
    MAX_PENDING_EVENTS, MAX_PENDING_EVENT_BYTES, WRITE_TIMEOUT,
};

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
    version: VersionInfo,
    #[serde(default)]
    capabilities: Vec<Value>,
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
        qmp.run(&QmpCapabilities)?;
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

    /// Timeout used by [`Qmp::run`].
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// Sets the timeout used by [`Qmp::run`].
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().closed.is_none()
    }

    /// Runs `command` and returns its reply.
    pub fn run<C: Command>(&self, command: &C) -> Result<C::Reply> {
        self.run_timeout(command, self.command_timeout)
    }

    /// Like [`Qmp::run`] with its own timeout. A reply arriving after the
    /// timeout is discarded.
    pub fn run_timeout<C: Command>(&self, command: &C, timeout: Duration) -> Result<C::Reply> {
        let arguments = serde_json::to_value(command).map_err(|source| Error::Encode {
            command: C::NAME.to_owned(),
            source,
        })?;
        let value = self.call(C::NAME, arguments, timeout)?;
        C::Reply::deserialize(value).map_err(|source| Error::Decode {
            what: format!("reply to {}", C::NAME),
            source,
        })
    }

    /// Sends `command` with `arguments` (none if `null`) and waits up to
    /// `timeout` for its `return` value.
    fn call(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
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
}

impl Qmp {
    /// Cancel the jobs `ids` (errors ignored: a job may have ended) and
    /// wait as [`Qmp::wait_jobs_concluded`] does.
    pub fn cancel_jobs(&self, ids: &[String], limit: Duration) -> Result<bool> {
        if ids.is_empty() {
            return Ok(true);
        }
        for id in ids {
            let _ = self.run(&JobCancel::new(id));
        }
        self.wait_jobs_concluded(ids, limit)
    }

    /// Wait until none of the jobs `ids` is running any more (each has
    /// concluded or is gone). `Ok(false)` if some still run after `limit`.
    pub fn wait_jobs_concluded(&self, ids: &[String], limit: Duration) -> Result<bool> {
        let deadline = deadline_after(limit);
        loop {
            let jobs = self.run(&QueryJobs)?;
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
    use crate::qmp::JobStatusChange;
    use serde_json::json;
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

    /// A command of the tests' own, with arguments.
    #[derive(serde::Serialize)]
    struct A {
        x: u32,
    }

    impl Command for A {
        const NAME: &'static str = "a";
        type Reply = Value;
    }

    /// Commands of the tests' own without arguments.
    macro_rules! unit_commands {
        ($($type:ident $name:literal),*) => {$(
            #[derive(serde::Serialize)]
            struct $type;

            impl Command for $type {
                const NAME: &'static str = $name;
                type Reply = Value;
            }
        )*};
    }

    unit_commands!(B "b", Hang "hang", Later "later", Slow "slow", Next "next");

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
            let a = s.spawn(|| qmp.run(&A { x: 1 }));
            let b = s.spawn(|| qmp.run(&B));
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
            let result = qmp.run(&Hang);
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
        assert!(matches!(qmp.run(&Later), Err(Error::Disconnected { .. })));
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
        let result = qmp.run_timeout(&Slow, Duration::from_millis(100));
        assert!(
            matches!(&result, Err(Error::Timeout { command, .. }) if command == "slow"),
            "{result:?}"
        );
        assert_eq!(qmp.run(&Next).unwrap(), json!("fresh"));
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

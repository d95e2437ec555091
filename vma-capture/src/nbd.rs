//! NBD server (fixed newstyle) that hands what clients write to a sink.
//!
//! QEMU's NBD client connects over a unix socket, picks an export with
//! `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) and then sends write, write-zeroes,
//! trim and flush requests, many of them in flight at once. Each connection
//! has a reader thread that decodes requests and a worker thread that calls
//! the [`NbdSink`] and sends the replies in request order, with a bounded
//! queue (in requests and payload bytes) between them.
//!
//! What the server does, where the protocol leaves a choice:
//!
//! - Only simple replies: `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_EXTENDED_HEADERS`,
//!   metadata contexts, `NBD_OPT_STARTTLS` and every other option not listed
//!   here get `NBD_REP_ERR_UNSUP`. Supported options: `EXPORT_NAME`, `GO`,
//!   `INFO`, `LIST` and `ABORT`.
//! - The export is write-only: `NBD_CMD_READ` is answered with `EIO` (no
//!   payload) and the connection stays up.
//! - Requests reaching past the export's end, unknown commands and unknown
//!   command flags get `EINVAL`; a write's payload is still read, so the
//!   stream stays in sync. (`EINVAL` rather than the `ENOSPC` the protocol
//!   suggests for writes past the end: such a write is a client bug, and
//!   QEMU's block jobs may pause and retry on `ENOSPC`.) One exception:
//!   QEMU rounds an export's size up to a multiple of 512 and writes that
//!   rounded tail too, so a request running past the end by less than that
//!   rounding is clipped at the end when the bytes past it are zero (see
//!   [`wire::check_request`]).
//! - Zero-length writes, write-zeroes and trims inside the export succeed
//!   without reaching the sink.
//! - A write longer than [`wire::MAX_PAYLOAD`] (the advertised maximum block
//!   size), a request with a bad magic or a malformed handshake closes the
//!   connection.
//! - `NBD_CMD_FLAG_FUA` and `NBD_CMD_FLAG_NO_HOLE` are accepted and change
//!   nothing. FUA is not advertised, so QEMU sends a flush instead.
//! - Sizes and offsets are bytes: the minimum block size is 1, so unaligned
//!   writes reach the sink exactly as the client sent them.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

/// Receives what a client writes to one export. Called from the server's
/// threads, possibly from several connections at once.
pub trait NbdSink: Send + Sync + 'static {
    /// Store `data` at byte `offset` of the export.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Store `len` zero bytes at byte `offset`.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The client no longer needs `len` bytes at `offset`. Default: ignored.
    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Make every write answered so far durable.
    fn flush(&self) -> io::Result<()>;
}

/// One export: its name, exact size in bytes and where its writes go.
#[derive(Clone)]
pub struct Export {
    /// Name the client asks for (may be empty: the default export).
    pub name: String,
    /// Size in bytes; any value, not necessarily a multiple of 512.
    pub size: u64,
    /// Receives the writes.
    pub sink: Arc<dyn NbdSink>,
}

/// An NBD server listening on a unix socket, serving each connection on
/// threads of its own. Dropping it shuts it down like [`NbdServer::shutdown`].
pub struct NbdServer {
    path: PathBuf,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

/// State shared by the accept thread, the connections and the server handle.
struct Shared {
    exports: Vec<Export>,
    stop: AtomicBool,
    /// Open connections, so that shutdown can close them.
    connections: Mutex<HashMap<u64, UnixStream>>,
}

impl NbdServer {
    /// Listen on a unix socket at `path` (created, so nothing may exist
    /// there yet; removed on shutdown) and serve `exports` on an accept thread.
    pub fn bind_unix(path: &Path, exports: Vec<Export>) -> io::Result<NbdServer> {
        let listener = UnixListener::bind(path)?;
        let shared = Arc::new(Shared {
            exports,
            stop: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&listener, &accept_shared));
        match accept {
            Ok(accept) => Ok(NbdServer {
                path: path.to_path_buf(),
                shared,
                accept: Some(accept),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Path of the listening socket.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Number of client connections currently open.
    pub fn connection_count(&self) -> usize {
        lock(&self.shared.connections).len()
    }

    /// Stop accepting, close every connection (requests not yet answered may
    /// be dropped), join the threads and remove the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread, blocked in accept(), with a connection of
        // our own. Should that fail (socket file removed), leave it blocked.
        let woken = UnixStream::connect(&self.path).is_ok();
        let connections = if woken {
            accept.join().unwrap_or_default()
        } else {
            Vec::new()
        };
        for stream in lock(&self.shared.connections).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for connection in connections {
            let _ = connection.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accept connections until the server stops; returns the connection threads
/// still to be joined.
fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return threads;
        }
        let Ok((stream, _)) = accepted else {
            // Out of file descriptors or similar: do not spin.
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        let (finished, running) = threads.into_iter().partition(|t| t.is_finished());
        threads = running;
        for thread in finished {
            let _ = thread.join();
        }
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        lock(&shared.connections).insert(id, registered);
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let _ = serve_connection(&stream, &conn_shared.exports);
                let _ = stream.shutdown(Shutdown::Both);
                lock(&conn_shared.connections).remove(&id);
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(_) => {
                if let Some(stream) = lock(&shared.connections).remove(&id) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// Reader buffer: many request headers per read() call.
const READ_BUFFER: usize = 128 * 1024;
/// Requests queued between a connection's reader and its worker.
const QUEUE_LEN: usize = 32;
/// Write payload bytes queued between a connection's reader and its worker.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;

fn serve_connection(stream: &UnixStream, exports: &[Export]) -> io::Result<()> {
    let mut reader = io::BufReader::with_capacity(READ_BUFFER, stream.try_clone()?);
    serve(&mut reader, stream, exports)
}

/// Serve one client connection: what the client sends is read from
/// `reader`, replies go to `writer`. Returns when the client disconnects,
/// ends the handshake, or breaks the protocol (an `InvalidData` error).
pub fn serve<R: Read, W: Write + Send>(
    reader: &mut R,
    mut writer: W,
    exports: &[Export],
) -> io::Result<()> {
    match handshake(reader, &mut writer, exports)? {
        Some(index) => transmission(reader, writer, &exports[index]),
        None => Ok(()),
    }
}

fn protocol_error(e: wire::WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Longest option payload the server reads into memory.
const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Transmission flags of every export.
const TRANSMISSION_FLAGS: u16 = wire::FLAG_HAS_FLAGS
    | wire::FLAG_SEND_FLUSH
    | wire::FLAG_SEND_TRIM
    | wire::FLAG_SEND_WRITE_ZEROES;

/// Option haggling. Returns the index of the chosen export, or `None` when
/// the client ended the session without choosing one.
fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &[Export],
) -> io::Result<Option<usize>> {
    w.write_all(&wire::encode_greeting())?;
    w.flush()?;
    let mut flags = [0u8; 4];
    r.read_exact(&mut flags)?;
    let client = wire::decode_client_flags(&flags).map_err(protocol_error)?;
    loop {
        let mut head = [0u8; wire::OPTION_HEADER_LEN];
        r.read_exact(&mut head)?;
        let opt = wire::decode_option_header(&head).map_err(protocol_error)?;
        let parsed = matches!(
            opt.option,
            wire::OPT_EXPORT_NAME | wire::OPT_INFO | wire::OPT_GO | wire::OPT_LIST
        );
        if !parsed || opt.len > MAX_OPTION_DATA {
            io::copy(&mut r.by_ref().take(u64::from(opt.len)), &mut io::sink())?;
            let reply = match opt.option {
                // Cannot be answered with an error.
                wire::OPT_EXPORT_NAME => return Ok(None),
                wire::OPT_ABORT => wire::REP_ACK,
                wire::OPT_INFO | wire::OPT_GO | wire::OPT_LIST => wire::REP_ERR_INVALID,
                _ => wire::REP_ERR_UNSUP,
            };
            w.write_all(&wire::encode_option_reply(opt.option, reply, &[]))?;
            w.flush()?;
            if opt.option == wire::OPT_ABORT {
                return Ok(None);
            }
            continue;
        }
        let mut data = vec![0u8; opt.len as usize];
        r.read_exact(&mut data)?;
        if opt.option == wire::OPT_EXPORT_NAME {
            let Some(index) = find_export(exports, &data) else {
                return Ok(None); // The protocol has no error reply here.
            };
            let size = exports[index].size;
            let reply = wire::encode_export_name_reply(size, TRANSMISSION_FLAGS, client.no_zeroes);
            w.write_all(&reply)?;
            w.flush()?;
            return Ok(Some(index));
        }
        let (replies, found) = match opt.option {
            wire::OPT_LIST => (list_replies(&data, exports), None),
            _ => info_replies(opt.option, &data, exports),
        };
        w.write_all(&replies)?;
        w.flush()?;
        if let (wire::OPT_GO, Some(index)) = (opt.option, found) {
            return Ok(Some(index));
        }
    }
}

fn find_export(exports: &[Export], name: &[u8]) -> Option<usize> {
    exports.iter().position(|e| e.name.as_bytes() == name)
}

/// The replies to `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then an ack.
fn list_replies(data: &[u8], exports: &[Export]) -> Vec<u8> {
    if !data.is_empty() {
        return wire::encode_option_reply(wire::OPT_LIST, wire::REP_ERR_INVALID, &[]);
    }
    let mut out = Vec::new();
    for export in exports {
        let name = export.name.as_bytes();
        let mut payload = (name.len() as u32).to_be_bytes().to_vec();
        payload.extend_from_slice(name);
        out.extend(wire::encode_option_reply(
            wire::OPT_LIST,
            wire::REP_SERVER,
            &payload,
        ));
    }
    out.extend(wire::encode_option_reply(
        wire::OPT_LIST,
        wire::REP_ACK,
        &[],
    ));
    out
}

/// The replies to `NBD_OPT_INFO` or `NBD_OPT_GO`, and the export they describe.
/// The block sizes are sent whether asked for or not, as the protocol allows.
fn info_replies(option: u32, data: &[u8], exports: &[Export]) -> (Vec<u8>, Option<usize>) {
    let Ok(request) = wire::decode_info_request(data) else {
        return (
            wire::encode_option_reply(option, wire::REP_ERR_INVALID, &[]),
            None,
        );
    };
    let Some(index) = find_export(exports, request.name) else {
        let message = b"no export of that name";
        return (
            wire::encode_option_reply(option, wire::REP_ERR_UNKNOWN, message),
            None,
        );
    };
    let export = wire::encode_info_export(exports[index].size, TRANSMISSION_FLAGS);
    let sizes =
        wire::encode_info_block_size(wire::MIN_BLOCK, wire::PREFERRED_BLOCK, wire::MAX_PAYLOAD);
    let mut out = wire::encode_option_reply(option, wire::REP_INFO, &export);
    out.extend(wire::encode_option_reply(option, wire::REP_INFO, &sizes));
    out.extend(wire::encode_option_reply(option, wire::REP_ACK, &[]));
    (out, Some(index))
}

/// Limits the write payload bytes queued between a connection's reader and
/// its worker. Closed once replies can no longer be sent.
struct Budget {
    state: Mutex<BudgetState>,
    changed: Condvar,
    limit: usize,
}

struct BudgetState {
    used: usize,
    closed: bool,
}

/// Bytes taken from a [`Budget`], given back on drop.
struct Reservation<'a> {
    budget: &'a Budget,
    bytes: usize,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget {
            state: Mutex::new(BudgetState {
                used: 0,
                closed: false,
            }),
            changed: Condvar::new(),
            limit,
        }
    }

    /// Wait until `bytes` fit (always at once when nothing is queued);
    /// `None` once the budget is closed.
    fn reserve(&self, bytes: usize) -> Option<Reservation<'_>> {
        let mut state = lock(&self.state);
        while !state.closed && state.used > 0 && state.used + bytes > self.limit {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return None;
        }
        state.used += bytes;
        Some(Reservation {
            budget: self,
            bytes,
        })
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.budget.state).used -= self.bytes;
        self.budget.changed.notify_all();
    }
}

/// Closes the budget when the worker ends, however it ends.
struct CloseOnDrop<'a>(&'a Budget);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One request for the worker: what to do and the cookie to answer with.
struct Job<'a> {
    cookie: u64,
    op: Op<'a>,
}

enum Op<'a> {
    Write {
        offset: u64,
        data: Vec<u8>,
        _reserved: Reservation<'a>,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Answer at once with this error code (0: success).
    Reply(u32),
}

impl Op<'_> {
    /// Run the operation; returns the NBD error code of the reply.
    fn execute(&self, sink: &dyn NbdSink) -> u32 {
        let result = match self {
            Op::Write { offset, data, .. } => sink.write(*offset, data),
            Op::WriteZeroes { offset, len } => sink.write_zeroes(*offset, *len),
            Op::Trim { offset, len } => sink.trim(*offset, *len),
            Op::Flush => sink.flush(),
            Op::Reply(code) => return *code,
        };
        match result {
            Ok(()) => 0,
            Err(e) => wire::error_code(&e),
        }
    }
}

/// The transmission phase: requests are read here, run and answered on a
/// worker thread. Returns when the client disconnects or breaks the protocol.
fn transmission<R: Read, W: Write + Send>(
    reader: &mut R,
    out: W,
    export: &Export,
) -> io::Result<()> {
    let budget = Budget::new(QUEUE_BYTES);
    let (jobs, queue) = crossbeam_channel::bounded(QUEUE_LEN);
    thread::scope(|scope| {
        let sink = &*export.sink;
        let budget = &budget;
        let worker = thread::Builder::new()
            .name("nbd-reply".into())
            .spawn_scoped(scope, move || reply_worker(queue, sink, out, budget))?;
        let result = read_requests(reader, export.size, &jobs, budget);
        drop(jobs);
        // Joined here, not only waited for by the scope: the thread has
        // fully exited (its thread-local state freed) when the connection's
        // serving returns.
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
        result
    })
}

fn reply_worker<W: Write>(
    queue: Receiver<Job<'_>>,
    sink: &dyn NbdSink,
    mut out: W,
    budget: &Budget,
) {
    let _close = CloseOnDrop(budget);
    let mut replying = true;
    // Keep draining after a failed reply so the reader never waits on a full queue.
    for job in queue {
        if !replying {
            continue;
        }
        let code = job.op.execute(sink);
        drop(job.op);
        let reply = wire::encode_simple_reply(code, job.cookie);
        if out.write_all(&reply).and_then(|()| out.flush()).is_err() {
            replying = false;
            budget.close();
        }
    }
}

fn read_requests<'a, R: Read>(
    reader: &mut R,
    size: u64,
    jobs: &Sender<Job<'a>>,
    budget: &'a Budget,
) -> io::Result<()> {
    loop {
        if budget.is_closed() {
            return Ok(());
        }
        let mut head = [0u8; wire::REQUEST_LEN];
        reader.read_exact(&mut head)?;
        let request = wire::decode_request(&head).map_err(protocol_error)?;
        let payload = if request.kind == wire::CMD_WRITE {
            let len = request.len;
            if len > wire::MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "write of {len} bytes is over the maximum of {}",
                        wire::MAX_PAYLOAD
                    ),
                ));
            }
            let Some(reserved) = budget.reserve(len as usize) else {
                return Ok(());
            };
            let mut data = Vec::with_capacity(len as usize);
            reader
                .by_ref()
                .take(u64::from(len))
                .read_to_end(&mut data)?;
            if data.len() != len as usize {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Some((data, reserved))
        } else {
            None
        };
        let data = payload.as_ref().map_or(&[][..], |p| &p.0[..]);
        let op = match (wire::check_request(&request, data, size), payload) {
            (wire::Action::Disconnect, _) => return Ok(()),
            (wire::Action::Write { offset, len }, Some((mut data, reserved))) => {
                data.truncate(len as usize);
                Op::Write {
                    offset,
                    data,
                    _reserved: reserved,
                }
            }
            (wire::Action::Write { .. }, None) => Op::Reply(wire::EINVAL),
            (wire::Action::WriteZeroes { offset, len }, _) => Op::WriteZeroes { offset, len },
            (wire::Action::Trim { offset, len }, _) => Op::Trim { offset, len },
            (wire::Action::Flush, _) => Op::Flush,
            (wire::Action::Reply(code), _) => Op::Reply(code),
        };
        let job = Job {
            cookie: request.cookie,
            op,
        };
        if jobs.send(job).is_err() {
            return Ok(());
        }
    }
}

/// Byte layout of the NBD messages the server reads and writes: pure
/// functions without I/O.
pub mod wire {
    use std::io;

    /// `NBDMAGIC`, first word of the server greeting.
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    /// `IHAVEOPT`, second word of the greeting and magic of every option.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// Magic of every option reply.
    pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    /// Magic of every request.
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    /// Magic of a simple reply.
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    /// Magic of a structured reply chunk.
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
    /// Magic of the old-style negotiation (not supported).
    pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

    /// Handshake flag: fixed newstyle negotiation.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    /// Handshake flag: the client may ask to skip the 124 zero bytes.
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    /// Client flag: fixed newstyle negotiation.
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    /// Transmission flag: always set.
    pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
    /// Transmission flag: the export is read-only.
    pub const FLAG_READ_ONLY: u16 = 1 << 1;
    /// Transmission flag: `NBD_CMD_FLUSH` is supported.
    pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
    /// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
    pub const FLAG_SEND_FUA: u16 = 1 << 3;
    /// Transmission flag: `NBD_CMD_TRIM` is supported.
    pub const FLAG_SEND_TRIM: u16 = 1 << 5;
    /// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
    pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
    pub const FLAG_SEND_DF: u16 = 1 << 7;

    /// Option: choose an export and enter transmission (no error reply possible).
    pub const OPT_EXPORT_NAME: u32 = 1;
    /// Option: end the session.
    pub const OPT_ABORT: u32 = 2;
    /// Option: list the exports.
    pub const OPT_LIST: u32 = 3;
    /// Option: describe an export.
    pub const OPT_INFO: u32 = 6;
    /// Option: describe an export and enter transmission.
    pub const OPT_GO: u32 = 7;
    /// Option: use structured replies (not supported by the server; the
    /// client asks for them).
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    /// Option: choose the metadata contexts of `NBD_CMD_BLOCK_STATUS`.
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    /// Option reply: done.
    pub const REP_ACK: u32 = 1;
    /// Option reply: one export of a list.
    pub const REP_SERVER: u32 = 2;
    /// Option reply: one piece of information about an export.
    pub const REP_INFO: u32 = 3;
    /// Option reply error: option not supported.
    pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
    /// Option reply error: option malformed.
    pub const REP_ERR_INVALID: u32 = 0x8000_0003;
    /// Option reply error: no export of that name.
    pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
    /// Option reply: one metadata context the server will report.
    pub const REP_META_CONTEXT: u32 = 4;
    /// Bit set in every option reply type that is an error.
    pub const REP_FLAG_ERROR: u32 = 0x8000_0000;

    /// Information type: size and transmission flags.
    pub const INFO_EXPORT: u16 = 0;
    /// Information type: block size constraints.
    pub const INFO_BLOCK_SIZE: u16 = 3;

    /// Command: read (answered with `EIO`: exports are write-only).
    pub const CMD_READ: u16 = 0;
    /// Command: write the payload that follows the request.
    pub const CMD_WRITE: u16 = 1;
    /// Command: disconnect (no reply).
    pub const CMD_DISC: u16 = 2;
    /// Command: flush.
    pub const CMD_FLUSH: u16 = 3;
    /// Command: trim.
    pub const CMD_TRIM: u16 = 4;
    /// Command: write zeroes.
    pub const CMD_WRITE_ZEROES: u16 = 6;

    /// Command: block status of a metadata context (client side only).
    pub const CMD_BLOCK_STATUS: u16 = 7;

    /// Command flag: force unit access.
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    /// Command flag: write zeroes without punching a hole.
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    /// Command flag: answer a read in one chunk ("don't fragment").
    pub const CMD_FLAG_DF: u16 = 1 << 2;

    /// Error code: input/output error.
    pub const EIO: u32 = 5;
    /// Error code: invalid argument.
    pub const EINVAL: u32 = 22;
    /// Error code: no space left.
    pub const ENOSPC: u32 = 28;
    /// Error code: operation not permitted.
    pub const EPERM: u32 = 1;
    /// Error code: out of memory.
    pub const ENOMEM: u32 = 12;
    /// Error code: value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Error code: operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Error code: the server is shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// Advertised minimum block size: any byte offset and length.
    pub const MIN_BLOCK: u32 = 1;
    /// Advertised preferred block size.
    pub const PREFERRED_BLOCK: u32 = 64 * 1024;
    /// Advertised maximum block size, and the longest write accepted.
    pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

    /// Structured reply chunk type: the last chunk, without payload.
    pub const REPLY_TYPE_NONE: u16 = 0;
    /// Structured reply chunk type: data read at an offset.
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    /// Structured reply chunk type: a stretch that reads as zeros.
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    /// Structured reply chunk type: block status descriptors.
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    /// Structured reply chunk type: an error.
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
    /// Structured reply chunk type: an error at an offset.
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
    /// Structured reply flag: the last chunk of the reply.
    pub const REPLY_FLAG_DONE: u16 = 1 << 0;
    /// `base:allocation` status bit: not allocated (may still read as data).
    pub const STATE_HOLE: u32 = 1 << 0;
    /// `base:allocation` status bit: reads as zeros.
    pub const STATE_ZERO: u32 = 1 << 1;
    /// The metadata context of allocation status.
    pub const BASE_ALLOCATION: &str = "base:allocation";

    /// Bytes of an option header.
    pub const OPTION_HEADER_LEN: usize = 16;
    /// Bytes of an option reply header.
    pub const OPTION_REPLY_HEADER_LEN: usize = 20;
    /// Bytes of a structured reply chunk header.
    pub const STRUCTURED_REPLY_LEN: usize = 20;
    /// Bytes of a request header.
    pub const REQUEST_LEN: usize = 28;
    /// Bytes of a simple reply.
    pub const SIMPLE_REPLY_LEN: usize = 16;

    /// What is wrong with a message.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[non_exhaustive]
    pub enum WireError {
        /// Fewer bytes than the message needs.
        #[error("NBD message truncated: {got} of {need} bytes")]
        Truncated {
            /// Bytes needed.
            need: usize,
            /// Bytes given.
            got: usize,
        },
        /// The magic number is not the expected one.
        #[error("bad NBD magic {0:#x}")]
        BadMagic(u64),
        /// The client set flags the server does not know.
        #[error("unknown NBD client flags {0:#x}")]
        UnknownClientFlags(u32),
        /// Lengths inside an option do not add up.
        #[error("malformed NBD option data")]
        BadOption,
        /// A reply the client cannot make sense of.
        #[error("malformed NBD reply: {0}")]
        BadReply(String),
        /// The server speaks the old-style negotiation (no export names).
        #[error("the NBD server uses the old-style negotiation, which is not supported")]
        Oldstyle,
    }

    /// Client flags the server acts on.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ClientFlags {
        /// Skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
        pub no_zeroes: bool,
    }

    /// An option header: which option and how many data bytes follow.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct OptionHeader {
        /// Option number (`OPT_*`).
        pub option: u32,
        /// Length of the option data that follows.
        pub len: u32,
    }

    /// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct InfoRequest<'a> {
        /// Export name, as sent.
        pub name: &'a [u8],
        /// Information types asked for (`INFO_*`).
        pub info: Vec<u16>,
    }

    /// A request header.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Request {
        /// Command flags (`CMD_FLAG_*`).
        pub flags: u16,
        /// Command (`CMD_*`).
        pub kind: u16,
        /// Opaque value the reply must carry (the "handle").
        pub cookie: u64,
        /// Byte offset.
        pub offset: u64,
        /// Byte length (of the payload, for a write).
        pub len: u32,
    }

    /// What the server does with a request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action {
        /// Write the first `len` bytes of the payload at `offset`.
        Write {
            /// Byte offset.
            offset: u64,
            /// Bytes of the payload to write (the rest is a zero tail past the end).
            len: u64,
        },
        /// Write `len` zero bytes at `offset`.
        WriteZeroes {
            /// Byte offset.
            offset: u64,
            /// Byte count.
            len: u64,
        },
        /// Trim `len` bytes at `offset`.
        Trim {
            /// Byte offset.
            offset: u64,
            /// Byte count.
            len: u64,
        },
        /// Flush the sink.
        Flush,
        /// End the connection without a reply.
        Disconnect,
        /// Reply with this error code without touching the sink (0: success).
        Reply(u32),
    }

    fn be_u16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    fn be_u32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn be_u64(b: &[u8], at: usize) -> u64 {
        (u64::from(be_u32(b, at)) << 32) | u64::from(be_u32(b, at + 4))
    }

    fn need(buf: &[u8], need: usize) -> Result<(), WireError> {
        if buf.len() < need {
            return Err(WireError::Truncated {
                need,
                got: buf.len(),
            });
        }
        Ok(())
    }

    /// The 18 bytes the server sends first.
    pub fn encode_greeting() -> [u8; 18] {
        let mut out = [0u8; 18];
        out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        out
    }

    /// Decode the client's 4-byte flags; unknown flags are an error.
    pub fn decode_client_flags(buf: &[u8]) -> Result<ClientFlags, WireError> {
        need(buf, 4)?;
        let flags = be_u32(buf, 0);
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(WireError::UnknownClientFlags(flags));
        }
        Ok(ClientFlags {
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        })
    }

    /// Decode a 16-byte option header.
    pub fn decode_option_header(buf: &[u8]) -> Result<OptionHeader, WireError> {
        need(buf, OPTION_HEADER_LEN)?;
        let magic = be_u64(buf, 0);
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic(magic));
        }
        Ok(OptionHeader {
            option: be_u32(buf, 8),
            len: be_u32(buf, 12),
        })
    }

    /// Decode the data of `NBD_OPT_INFO` or `NBD_OPT_GO`: name length, name,
    /// count of information requests, the requests. Must be exactly that long.
    pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest<'_>, WireError> {
        need(data, 4)?;
        let name_len = be_u32(data, 0) as usize;
        let name_end = name_len.checked_add(4).ok_or(WireError::BadOption)?;
        need(data, name_end.saturating_add(2))?;
        let count = usize::from(be_u16(data, name_end));
        let body = &data[name_end + 2..];
        if body.len() != count * 2 {
            return Err(WireError::BadOption);
        }
        Ok(InfoRequest {
            name: &data[4..name_end],
            info: body.chunks_exact(2).map(|c| be_u16(c, 0)).collect(),
        })
    }

    /// An option reply: header and `payload`.
    pub fn encode_option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + payload.len());
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&reply.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Payload of `NBD_REP_INFO` with `NBD_INFO_EXPORT`.
    pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        out[2..10].copy_from_slice(&size.to_be_bytes());
        out[10..].copy_from_slice(&flags.to_be_bytes());
        out
    }

    /// Payload of `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`.
    pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
        let mut out = [0u8; 14];
        out[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        out[2..6].copy_from_slice(&min.to_be_bytes());
        out[6..10].copy_from_slice(&preferred.to_be_bytes());
        out[10..].copy_from_slice(&max.to_be_bytes());
        out
    }

    /// The answer to `NBD_OPT_EXPORT_NAME`: size, flags and, unless the
    /// client asked for no zeroes, 124 zero bytes.
    pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(134);
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        if !no_zeroes {
            out.resize(out.len() + 124, 0);
        }
        out
    }

    /// Decode a 28-byte request header.
    pub fn decode_request(buf: &[u8]) -> Result<Request, WireError> {
        need(buf, REQUEST_LEN)?;
        let magic = be_u32(buf, 0);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic(u64::from(magic)));
        }
        Ok(Request {
            flags: be_u16(buf, 4),
            kind: be_u16(buf, 6),
            cookie: be_u64(buf, 8),
            offset: be_u64(buf, 16),
            len: be_u32(buf, 24),
        })
    }

    /// Encode a request header (what a client sends).
    pub fn encode_request(request: &Request) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&request.flags.to_be_bytes());
        out[6..8].copy_from_slice(&request.kind.to_be_bytes());
        out[8..16].copy_from_slice(&request.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&request.offset.to_be_bytes());
        out[24..].copy_from_slice(&request.len.to_be_bytes());
        out
    }

    /// A simple reply: magic, error code (0: success), cookie.
    pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&error.to_be_bytes());
        out[8..].copy_from_slice(&cookie.to_be_bytes());
        out
    }

    /// Decide what to do with a request to an export of `size` bytes;
    /// `payload` is a write's data (empty for other commands).
    ///
    /// QEMU's block layer rounds sizes up to 512 bytes, so for an export
    /// whose size is not a multiple of 512 it sends requests that run into
    /// that rounded tail. Such a request is clipped at the export's end when
    /// the part past the end is all zero (always so for write-zeroes and
    /// trim); any other request past the end gets `EINVAL`.
    pub fn check_request(request: &Request, payload: &[u8], size: u64) -> Action {
        let (offset, len) = (request.offset, u64::from(request.len));
        match request.kind {
            CMD_DISC => return Action::Disconnect,
            CMD_FLUSH => return Action::Flush,
            CMD_READ => return Action::Reply(EIO),
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {}
            _ => return Action::Reply(EINVAL),
        }
        if request.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 {
            return Action::Reply(EINVAL);
        }
        let Some(end) = offset.checked_add(len) else {
            return Action::Reply(EINVAL);
        };
        let sector_end = size.checked_next_multiple_of(512).unwrap_or(size);
        if end > sector_end {
            return Action::Reply(EINVAL);
        }
        // Bytes inside the export; the rest lies in QEMU's rounded tail.
        let keep = size.saturating_sub(offset).min(len);
        if request.kind == CMD_WRITE {
            let Some(past_end) = payload.get(keep as usize..) else {
                return Action::Reply(EINVAL);
            };
            if payload.len() as u64 != len || past_end.iter().any(|&b| b != 0) {
                return Action::Reply(EINVAL);
            }
        }
        if keep == 0 {
            return Action::Reply(0);
        }
        match request.kind {
            CMD_WRITE => Action::Write { offset, len: keep },
            CMD_WRITE_ZEROES => Action::WriteZeroes { offset, len: keep },
            _ => Action::Trim { offset, len: keep },
        }
    }

    /// The handshake flags of the server's 18-byte greeting, as a client
    /// reads it.
    pub fn decode_greeting(buf: &[u8]) -> Result<u16, WireError> {
        need(buf, 16)?;
        let magic = be_u64(buf, 0);
        if magic != NBDMAGIC {
            return Err(WireError::BadMagic(magic));
        }
        match be_u64(buf, 8) {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => return Err(WireError::Oldstyle),
            other => return Err(WireError::BadMagic(other)),
        }
        need(buf, 18)?;
        Ok(be_u16(buf, 16))
    }

    /// The client's 4-byte flags: fixed newstyle, and no zeroes if asked.
    pub fn encode_client_flags(no_zeroes: bool) -> [u8; 4] {
        let mut flags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            flags |= FLAG_C_NO_ZEROES;
        }
        flags.to_be_bytes()
    }

    /// An option as the client sends it: header and data.
    pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// The data of `NBD_OPT_INFO` or `NBD_OPT_GO`: the export name and the
    /// information types asked for.
    pub fn encode_info_request(name: &[u8], info: &[u16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + name.len() + 2 * info.len());
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&(info.len() as u16).to_be_bytes());
        for i in info {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }

    /// The data of `NBD_OPT_SET_META_CONTEXT`: the export name and the
    /// context queries.
    pub fn encode_meta_context_request(name: &[u8], queries: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            out.extend_from_slice(&(q.len() as u32).to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
        out
    }

    /// The header of an option reply.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct OptionReply {
        /// The option answered.
        pub option: u32,
        /// Reply type (`REP_*`; errors have [`REP_FLAG_ERROR`] set).
        pub reply: u32,
        /// Length of the payload that follows.
        pub len: u32,
    }

    /// Decode a 20-byte option reply header.
    pub fn decode_option_reply_header(buf: &[u8]) -> Result<OptionReply, WireError> {
        need(buf, OPTION_REPLY_HEADER_LEN)?;
        let magic = be_u64(buf, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        Ok(OptionReply {
            option: be_u32(buf, 8),
            reply: be_u32(buf, 12),
            len: be_u32(buf, 16),
        })
    }

    /// One `NBD_REP_INFO` payload.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Info {
        /// Size and transmission flags.
        Export {
            /// Export size in bytes.
            size: u64,
            /// Transmission flags (`FLAG_*`).
            flags: u16,
        },
        /// Block size constraints.
        BlockSize {
            /// Minimum (alignment of requests).
            min: u32,
            /// Preferred.
            preferred: u32,
            /// Maximum payload of one request.
            max: u32,
        },
        /// An information type the client does not use.
        Other(u16),
    }

    /// Decode an `NBD_REP_INFO` payload.
    pub fn decode_info(payload: &[u8]) -> Result<Info, WireError> {
        need(payload, 2)?;
        let bad = |what: &str| WireError::BadReply(what.to_owned());
        match be_u16(payload, 0) {
            INFO_EXPORT if payload.len() == 12 => Ok(Info::Export {
                size: be_u64(payload, 2),
                flags: be_u16(payload, 10),
            }),
            INFO_EXPORT => Err(bad("NBD_INFO_EXPORT is not 12 bytes")),
            INFO_BLOCK_SIZE if payload.len() == 14 => Ok(Info::BlockSize {
                min: be_u32(payload, 2),
                preferred: be_u32(payload, 6),
                max: be_u32(payload, 10),
            }),
            INFO_BLOCK_SIZE => Err(bad("NBD_INFO_BLOCK_SIZE is not 14 bytes")),
            other => Ok(Info::Other(other)),
        }
    }

    /// Decode an `NBD_REP_META_CONTEXT` payload: context id and name.
    pub fn decode_meta_context(payload: &[u8]) -> Result<(u32, &[u8]), WireError> {
        need(payload, 4)?;
        Ok((be_u32(payload, 0), &payload[4..]))
    }

    /// The header of a transmission reply.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ReplyHeader {
        /// A simple reply; a successful read's data follows.
        Simple {
            /// Error code (0: success).
            error: u32,
            /// Cookie of the request.
            cookie: u64,
        },
        /// One chunk of a structured reply; `len` payload bytes follow.
        Structured {
            /// Chunk flags (`REPLY_FLAG_*`).
            flags: u16,
            /// Chunk type (`REPLY_TYPE_*`).
            kind: u16,
            /// Cookie of the request.
            cookie: u64,
            /// Payload length.
            len: u32,
        },
    }

    /// Length of the reply header that starts with `magic` (the first four
    /// bytes), magic included.
    pub fn reply_header_len(magic: &[u8]) -> Result<usize, WireError> {
        need(magic, 4)?;
        match be_u32(magic, 0) {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
            other => Err(WireError::BadMagic(u64::from(other))),
        }
    }

    /// Decode a reply header (16 bytes simple, 20 bytes structured).
    pub fn decode_reply_header(buf: &[u8]) -> Result<ReplyHeader, WireError> {
        let len = reply_header_len(buf)?;
        need(buf, len)?;
        Ok(if len == SIMPLE_REPLY_LEN {
            ReplyHeader::Simple {
                error: be_u32(buf, 4),
                cookie: be_u64(buf, 8),
            }
        } else {
            ReplyHeader::Structured {
                flags: be_u16(buf, 4),
                kind: be_u16(buf, 6),
                cookie: be_u64(buf, 8),
                len: be_u32(buf, 16),
            }
        })
    }

    /// Decode the payload of `NBD_REPLY_TYPE_OFFSET_HOLE`: offset, length.
    pub fn decode_offset_hole(payload: &[u8]) -> Result<(u64, u32), WireError> {
        if payload.len() != 12 {
            return Err(WireError::BadReply(format!(
                "an NBD_REPLY_TYPE_OFFSET_HOLE chunk of {} bytes (12 expected)",
                payload.len()
            )));
        }
        Ok((be_u64(payload, 0), be_u32(payload, 8)))
    }

    /// An error chunk: code, the server's message and the offset it names.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ChunkError {
        /// NBD error code.
        pub code: u32,
        /// The server's message (may be empty).
        pub message: String,
        /// Offset of the error (`NBD_REPLY_TYPE_ERROR_OFFSET`).
        pub offset: Option<u64>,
    }

    /// Decode the payload of an error chunk of type `kind`.
    pub fn decode_error_chunk(kind: u16, payload: &[u8]) -> Result<ChunkError, WireError> {
        need(payload, 6)?;
        let code = be_u32(payload, 0);
        let message_len = usize::from(be_u16(payload, 4));
        need(payload, 6 + message_len)?;
        let message = String::from_utf8_lossy(&payload[6..6 + message_len]).into_owned();
        let rest = &payload[6 + message_len..];
        let offset = match (kind, rest.len()) {
            (REPLY_TYPE_ERROR_OFFSET, 8) => Some(be_u64(rest, 0)),
            (REPLY_TYPE_ERROR_OFFSET, _) => {
                return Err(WireError::BadReply(
                    "an NBD_REPLY_TYPE_ERROR_OFFSET chunk without its offset".into(),
                ))
            }
            _ => None,
        };
        Ok(ChunkError {
            code,
            message,
            offset,
        })
    }

    /// Decode the payload of `NBD_REPLY_TYPE_BLOCK_STATUS`: the context id
    /// and the (length, flags) descriptors.
    pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), WireError> {
        need(payload, 4)?;
        let body = &payload[4..];
        if body.is_empty() || !body.len().is_multiple_of(8) {
            return Err(WireError::BadReply(format!(
                "an NBD_REPLY_TYPE_BLOCK_STATUS chunk of {} bytes",
                payload.len()
            )));
        }
        let descriptors = body
            .chunks_exact(8)
            .map(|d| (be_u32(d, 0), be_u32(d, 4)))
            .collect();
        Ok((be_u32(payload, 0), descriptors))
    }

    /// The name of an NBD error code, for messages.
    pub fn error_name(code: u32) -> String {
        match code {
            EPERM => "EPERM (operation not permitted)".into(),
            EIO => "EIO (input/output error)".into(),
            ENOMEM => "ENOMEM (out of memory)".into(),
            EINVAL => "EINVAL (invalid argument)".into(),
            ENOSPC => "ENOSPC (no space left)".into(),
            EOVERFLOW => "EOVERFLOW (value too large)".into(),
            ENOTSUP => "ENOTSUP (not supported)".into(),
            ESHUTDOWN => "ESHUTDOWN (server shutting down)".into(),
            other => format!("error {other}"),
        }
    }

    /// The NBD error code for a sink error: `ENOSPC` for a full device or
    /// quota (`ENOSPC`, `EDQUOT`, `EFBIG`), `EIO` for anything else.
    pub fn error_code(error: &io::Error) -> u32 {
        match error.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
            _ => EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wire::*;
    use super::*;
    use std::io::Cursor;

    fn request(kind: u16, offset: u64, len: u32) -> Request {
        Request {
            flags: 0,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1_0000_0200,
            len: 4096,
        };
        let bytes = encode_request(&r);
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(decode_request(&bytes), Ok(r));
    }

    #[test]
    fn request_truncated_and_bad_magic() {
        let bytes = encode_request(&request(CMD_WRITE, 0, 1));
        for n in 0..REQUEST_LEN {
            assert_eq!(
                decode_request(&bytes[..n]),
                Err(WireError::Truncated {
                    need: REQUEST_LEN,
                    got: n
                })
            );
        }
        let mut bad = bytes;
        bad[0] ^= 0xff;
        assert!(matches!(decode_request(&bad), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn option_header() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&OPT_GO.to_be_bytes());
        bytes.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&bytes),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 9
            })
        );
        assert!(matches!(
            decode_option_header(&bytes[..15]),
            Err(WireError::Truncated { .. })
        ));
        bytes[3] = 0;
        assert!(matches!(
            decode_option_header(&bytes),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 3]),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 1]),
            Ok(ClientFlags { no_zeroes: false })
        );
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 4]),
            Err(WireError::UnknownClientFlags(4))
        );
        assert!(decode_client_flags(&[0, 0, 1]).is_err());
    }

    fn info_data(name: &[u8], info: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(info.len() as u16).to_be_bytes());
        for i in info {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn info_request() {
        let d = info_data(b"drive", &[INFO_BLOCK_SIZE, 1]);
        let r = decode_info_request(&d).unwrap();
        assert_eq!(r.name, b"drive");
        assert_eq!(r.info, vec![INFO_BLOCK_SIZE, 1]);
        assert_eq!(decode_info_request(&info_data(b"", &[])).unwrap().name, b"");
        // Every truncation and an extra byte are rejected.
        for n in 0..d.len() {
            assert!(decode_info_request(&d[..n]).is_err(), "{n}");
        }
        let mut long = d.clone();
        long.push(0);
        assert_eq!(decode_info_request(&long), Err(WireError::BadOption));
        // A huge name length does not overflow.
        let mut huge = d;
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_info_request(&huge).is_err());
    }

    #[test]
    fn replies() {
        assert_eq!(
            encode_simple_reply(EIO, 0xaabb),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb]
        );
        let r = encode_option_reply(OPT_GO, REP_ACK, b"xy");
        assert_eq!(&r[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..20], &[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(&r[20..], b"xy");
        assert_eq!(
            encode_info_export(0x0102, 0x65),
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0x65]
        );
        assert_eq!(
            encode_info_block_size(1, 65536, 32 << 20),
            [0, 3, 0, 0, 0, 1, 0, 1, 0, 0, 2, 0, 0, 0]
        );
        assert_eq!(encode_export_name_reply(5, 1, true).len(), 10);
        assert_eq!(encode_export_name_reply(5, 1, false).len(), 134);
        let g = encode_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn check_requests() {
        let size = 3 * 65536 + 512;
        let check = |kind, offset, len| check_request(&request(kind, offset, len), &[], size);
        let write = |offset, payload: &[u8]| {
            check_request(
                &request(CMD_WRITE, offset, payload.len() as u32),
                payload,
                size,
            )
        };
        assert_eq!(
            write(3 * 65536, &[1; 512]),
            Action::Write {
                offset: 3 * 65536,
                len: 512
            }
        );
        assert_eq!(
            write(1536, &[1; 4096]),
            Action::Write {
                offset: 1536,
                len: 4096
            }
        );
        assert_eq!(write(3 * 65536 + 1, &[0; 512]), Action::Reply(EINVAL));
        assert_eq!(write(size, &[]), Action::Reply(0));
        assert_eq!(write(size + 1, &[]), Action::Reply(EINVAL));
        // The payload must be as long as the request says.
        assert_eq!(
            check_request(&request(CMD_WRITE, 0, 10), &[1; 9], size),
            Action::Reply(EINVAL)
        );
        assert_eq!(check(CMD_WRITE_ZEROES, u64::MAX, 2), Action::Reply(EINVAL));
        assert_eq!(check(CMD_TRIM, 0, 10), Action::Trim { offset: 0, len: 10 });
        assert_eq!(
            check(CMD_WRITE_ZEROES, 10, 20),
            Action::WriteZeroes {
                offset: 10,
                len: 20
            }
        );
        assert_eq!(check(CMD_READ, 0, 512), Action::Reply(EIO));
        assert_eq!(check(CMD_FLUSH, 0, 0), Action::Flush);
        assert_eq!(check(CMD_DISC, 0, 0), Action::Disconnect);
        assert_eq!(check(5, 0, 512), Action::Reply(EINVAL));
        assert_eq!(check(99, 0, 512), Action::Reply(EINVAL));
        let mut flagged = request(CMD_WRITE_ZEROES, 0, 512);
        flagged.flags = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE;
        assert_eq!(
            check_request(&flagged, &[], size),
            Action::WriteZeroes {
                offset: 0,
                len: 512
            }
        );
        flagged.flags |= 1 << 4;
        assert_eq!(check_request(&flagged, &[], size), Action::Reply(EINVAL));
    }

    #[test]
    fn check_requests_in_the_rounded_tail() {
        let size = 1000;
        let write = |offset, payload: &[u8]| {
            check_request(
                &request(CMD_WRITE, offset, payload.len() as u32),
                payload,
                size,
            )
        };
        let mut tail = vec![7u8; 488];
        tail.resize(512, 0);
        assert_eq!(
            write(512, &tail),
            Action::Write {
                offset: 512,
                len: 488
            }
        );
        assert_eq!(write(1000, &[0; 24]), Action::Reply(0));
        assert_eq!(write(1000, &[0; 25]), Action::Reply(EINVAL));
        tail[500] = 1;
        assert_eq!(write(512, &tail), Action::Reply(EINVAL));
        let zero = check_request(&request(CMD_WRITE_ZEROES, 0, 1024), &[], size);
        assert_eq!(
            zero,
            Action::WriteZeroes {
                offset: 0,
                len: 1000
            }
        );
        let trim = check_request(&request(CMD_TRIM, 1000, 24), &[], size);
        assert_eq!(trim, Action::Reply(0));
        let past = check_request(&request(CMD_TRIM, 1000, 25), &[], size);
        assert_eq!(past, Action::Reply(EINVAL));
        // No overflow at the top of the range.
        let top = check_request(&request(CMD_TRIM, u64::MAX - 1, 1), &[], u64::MAX);
        assert_eq!(
            top,
            Action::Trim {
                offset: u64::MAX - 1,
                len: 1
            }
        );
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            error_code(&io::Error::from_raw_os_error(libc::ENOSPC)),
            ENOSPC
        );
        assert_eq!(
            error_code(&io::Error::from_raw_os_error(libc::EDQUOT)),
            ENOSPC
        );
        assert_eq!(error_code(&io::Error::from_raw_os_error(libc::EACCES)), EIO);
        assert_eq!(error_code(&io::Error::other("broken")), EIO);
    }

    /// Records what reaches it.
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl NbdSink for Log {
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            lock(&self.0).push(format!("write {offset} {}", data.len()));
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
            lock(&self.0).push(format!("zero {offset} {len}"));
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            lock(&self.0).push("flush".into());
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
    }

    fn export(name: &str, size: u64) -> (Export, Arc<Log>) {
        let log = Arc::new(Log::default());
        let sink: Arc<dyn NbdSink> = log.clone();
        let e = Export {
            name: name.into(),
            size,
            sink,
        };
        (e, log)
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut o = IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&option.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        o
    }

    /// Split option replies into (option, reply type, payload).
    fn option_replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(&bytes[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let num = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
            let len = num(16) as usize;
            out.push((num(8), num(12), bytes[20..20 + len].to_vec()));
            bytes = &bytes[20 + len..];
        }
        out
    }

    #[test]
    fn handshake_go_after_unsupported_and_unknown() {
        let (e, _) = export("disk", 1000);
        let mut input = vec![0, 0, 0, 3];
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(0x1234, b"whatever"));
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(OPT_INFO, &info_data(b"nope", &[])));
        input.extend(option(OPT_GO, &[1, 2]));
        input.extend(option(OPT_GO, &info_data(b"disk", &[INFO_BLOCK_SIZE])));
        let mut out = Vec::new();
        let chosen = handshake(&mut Cursor::new(input), &mut out, &[e]).unwrap();
        assert_eq!(chosen, Some(0));
        assert_eq!(&out[..18], &encode_greeting());
        let replies = option_replies(&out[18..]);
        let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_STRUCTURED_REPLY, REP_ERR_UNSUP),
                (0x1234, REP_ERR_UNSUP),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_INFO, REP_ERR_UNKNOWN),
                (OPT_GO, REP_ERR_INVALID),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(replies[2].2, b"\0\0\0\x04disk");
        assert_eq!(replies[6].2, encode_info_export(1000, TRANSMISSION_FLAGS));
        assert_eq!(
            replies[7].2,
            encode_info_block_size(1, 65536, 32 * 1024 * 1024)
        );
    }

    #[test]
    fn handshake_export_name_and_abort() {
        let (e, _) = export("", 4096);
        for no_zeroes in [false, true] {
            let mut input = vec![0, 0, 0, if no_zeroes { 3 } else { 1 }];
            input.extend(option(OPT_EXPORT_NAME, b""));
            let mut out = Vec::new();
            let chosen =
                handshake(&mut Cursor::new(input), &mut out, std::slice::from_ref(&e)).unwrap();
            assert_eq!(chosen, Some(0));
            assert_eq!(
                &out[18..],
                &encode_export_name_reply(4096, TRANSMISSION_FLAGS, no_zeroes)[..]
            );
        }
        let mut input = vec![0, 0, 0, 1];
        input.extend(option(OPT_EXPORT_NAME, b"other"));
        let mut out = Vec::new();
        assert_eq!(
            handshake(&mut Cursor::new(input), &mut out, std::slice::from_ref(&e)).unwrap(),
            None
        );
        assert_eq!(out.len(), 18);

        let mut input = vec![0, 0, 0, 1];
        input.extend(option(OPT_ABORT, &[]));
        let mut out = Vec::new();
        assert_eq!(
            handshake(&mut Cursor::new(input), &mut out, &[e]).unwrap(),
            None
        );
        assert_eq!(
            option_replies(&out[18..]),
            vec![(OPT_ABORT, REP_ACK, vec![])]
        );
    }

    #[test]
    fn handshake_never_panics_on_truncation_or_garbage() {
        let (e, _) = export("disk", 1000);
        let mut input = vec![0, 0, 0, 3];
        input.extend(option(OPT_INFO, &info_data(b"disk", &[INFO_BLOCK_SIZE])));
        input.extend(option(OPT_GO, &info_data(b"disk", &[])));
        for n in 0..input.len() {
            let mut out = Vec::new();
            let r = handshake(
                &mut Cursor::new(&input[..n]),
                &mut out,
                std::slice::from_ref(&e),
            );
            assert!(r.is_err(), "{n}");
        }
        let mut garbage = vec![0, 0, 0, 1];
        garbage.extend_from_slice(b"not an option header at all");
        let mut out = Vec::new();
        assert!(handshake(
            &mut Cursor::new(garbage),
            &mut out,
            std::slice::from_ref(&e)
        )
        .is_err());
        assert!(handshake(&mut Cursor::new(vec![0xff; 8]), &mut Vec::new(), &[e]).is_err());
    }

    #[test]
    fn client_side_decoders() {
        let mut greeting = encode_greeting().to_vec();
        assert_eq!(
            decode_greeting(&greeting),
            Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        );
        greeting[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert_eq!(decode_greeting(&greeting), Err(WireError::Oldstyle));
        let reply = encode_option_reply(OPT_GO, REP_INFO, &encode_info_export(4096, 3));
        let head = decode_option_reply_header(&reply).unwrap();
        assert_eq!((head.option, head.reply, head.len), (OPT_GO, REP_INFO, 12));
        assert_eq!(
            decode_info(&reply[OPTION_REPLY_HEADER_LEN..]),
            Ok(Info::Export {
                size: 4096,
                flags: 3
            })
        );
        assert_eq!(
            decode_info(&encode_info_block_size(512, 4096, 1 << 25)),
            Ok(Info::BlockSize {
                min: 512,
                preferred: 4096,
                max: 1 << 25
            })
        );
        assert!(decode_info(&[0, 0, 1]).is_err());
        let simple = encode_simple_reply(EIO, 77);
        assert_eq!(
            decode_reply_header(&simple),
            Ok(ReplyHeader::Simple {
                error: EIO,
                cookie: 77
            })
        );
        let mut status = 9u32.to_be_bytes().to_vec();
        for (len, flags) in [(4096u32, STATE_HOLE | STATE_ZERO), (512, 0)] {
            status.extend_from_slice(&len.to_be_bytes());
            status.extend_from_slice(&flags.to_be_bytes());
        }
        assert_eq!(
            decode_block_status(&status),
            Ok((9, vec![(4096, STATE_HOLE | STATE_ZERO), (512, 0)]))
        );
        assert!(decode_block_status(&status[..7]).is_err());
        assert!(decode_block_status(&status[..4]).is_err());
        let mut err = ENOSPC.to_be_bytes().to_vec();
        err.extend_from_slice(&2u16.to_be_bytes());
        err.extend_from_slice(b"no");
        assert_eq!(
            decode_error_chunk(REPLY_TYPE_ERROR, &err),
            Ok(ChunkError {
                code: ENOSPC,
                message: "no".into(),
                offset: None
            })
        );
        // ERROR_OFFSET without its offset, and a message longer than the chunk.
        assert!(decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &err).is_err());
        err[5] = 200;
        assert!(decode_error_chunk(REPLY_TYPE_ERROR, &err).is_err());
        assert!(decode_offset_hole(&[0; 11]).is_err());
    }

    proptest::proptest! {
        /// No bytes make a client-side decoder panic.
        #[test]
        fn client_side_decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode_greeting(&bytes);
            let _ = decode_option_reply_header(&bytes);
            let _ = decode_info(&bytes);
            let _ = decode_meta_context(&bytes);
            let _ = reply_header_len(&bytes);
            let _ = decode_reply_header(&bytes);
            let _ = decode_offset_hole(&bytes);
            let _ = decode_error_chunk(REPLY_TYPE_ERROR, &bytes);
            let _ = decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &bytes);
            let _ = decode_block_status(&bytes);
        }
    }

    fn replies_of(out: &[u8]) -> Vec<(u32, u64)> {
        out.chunks(SIMPLE_REPLY_LEN)
            .map(|r| {
                assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
                (
                    u32::from_be_bytes(r[4..8].try_into().unwrap()),
                    u64::from_be_bytes(r[8..16].try_into().unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn transmission_replies_by_cookie_and_stays_in_sync() {
        let (e, log) = export("disk", 10_000);
        let mut input = Vec::new();
        let mut push = |kind, cookie, offset, len, payload: bool| {
            let r = Request {
                flags: 0,
                kind,
                cookie,
                offset,
                len,
            };
            input.extend_from_slice(&encode_request(&r));
            if payload {
                input.extend(vec![0xab; len as usize]);
            }
        };
        push(CMD_WRITE, 1, 1536, 4096, true);
        push(CMD_WRITE, 2, 9_999, 2, true); // past the end, payload skipped
        push(CMD_READ, 3, 0, 512, false);
        push(CMD_WRITE_ZEROES, 4, 0, 10_000, false);
        push(CMD_TRIM, 5, 0, 512, false);
        push(CMD_FLUSH, 6, 0, 0, false);
        push(CMD_WRITE, 7, 9_999, 1, true);
        push(CMD_DISC, 8, 0, 0, false);
        push(CMD_WRITE, 9, 0, 1, true); // after DISC: never read
        let mut out = Vec::new();
        transmission(&mut Cursor::new(input), &mut out, &e).unwrap();
        assert_eq!(
            replies_of(&out),
            vec![
                (0, 1),
                (EINVAL, 2),
                (EIO, 3),
                (0, 4),
                (0, 5),
                (ENOSPC, 6),
                (0, 7)
            ]
        );
        assert_eq!(
            *lock(&log.0),
            vec!["write 1536 4096", "zero 0 10000", "flush", "write 9999 1"]
        );
    }

    #[test]
    fn transmission_closes_on_bad_magic_oversize_and_truncation() {
        let (e, log) = export("disk", 1 << 40);
        let write = |len: u32| {
            encode_request(&Request {
                flags: 0,
                kind: CMD_WRITE,
                cookie: 1,
                offset: 0,
                len,
            })
        };
        let mut bad = write(1).to_vec();
        bad[1] = 0;
        assert!(transmission(&mut Cursor::new(bad), Vec::new(), &e).is_err());
        let huge = write(MAX_PAYLOAD + 1).to_vec();
        assert!(transmission(&mut Cursor::new(huge), Vec::new(), &e).is_err());
        let mut short = write(100).to_vec();
        short.extend_from_slice(&[1; 99]);
        assert!(transmission(&mut Cursor::new(short), Vec::new(), &e).is_err());
        let partial = write(1)[..20].to_vec();
        assert!(transmission(&mut Cursor::new(partial), Vec::new(), &e).is_err());
        assert!(lock(&log.0).is_empty());
    }

    #[test]
    fn budget_waits_for_release() {
        let budget = Budget::new(100);
        let a = budget.reserve(80).unwrap();
        let big = budget.reserve(0).unwrap(); // zero always fits
        drop(big);
        thread::scope(|s| {
            let waiter = s.spawn(|| budget.reserve(50).map(|r| r.bytes));
            thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished());
            drop(a);
            assert_eq!(waiter.join().unwrap(), Some(50));
        });
        // More than the limit fits when nothing else is queued.
        assert!(budget.reserve(1000).is_some());
        budget.close();
        assert!(budget.reserve(1).is_none());
    }
}

//! NBD server (fixed newstyle) over exports that implement [`NbdExport`].
//!
//! A client connects over a unix socket or TCP (in clear, or with TLS
//! after `NBD_OPT_STARTTLS`, see [`crate::tls`]), picks an export with
//! `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) and then sends requests, many
//! of them in flight at once. Each connection has a reader thread that
//! decodes requests and a worker thread that calls the export and sends
//! the replies in request order, with a bounded queue (in requests and
//! write payload bytes) between them. Several connections are served at
//! once, each on threads of its own.
//!
//! One server serves two kinds of export: write-only targets (QEMU's
//! backup job writes into them) and read-only views (QEMU or `nbdinfo`
//! read from them). What the server does, where the protocol leaves a
//! choice:
//!
//! - Structured replies and metadata contexts (`NBD_OPT_STRUCTURED_REPLY`,
//!   `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_LIST_META_CONTEXT`) are offered
//!   only when some export can be read or reports block status; a server
//!   of write-only exports answers them, `NBD_OPT_EXTENDED_HEADERS`
//!   and every other option not listed here with `NBD_REP_ERR_UNSUP`.
//!   Always supported: `EXPORT_NAME`, `GO`, `INFO`, `LIST` and `ABORT`.
//! - TLS: a server without TLS answers `NBD_OPT_STARTTLS` with
//!   `NBD_REP_ERR_UNSUP`. A server with TLS requires it (the protocol's
//!   "TLS-only" mode, NBD protocol, section "TLS support"): before
//!   `NBD_OPT_STARTTLS` every option but `ABORT` is answered with
//!   `NBD_REP_ERR_TLS_REQD` (`EXPORT_NAME`, which cannot be answered,
//!   closes the connection), so no export is named, described or served
//!   in clear; a second `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_INVALID`.
//! - `NBD_INFO_BLOCK_SIZE` is sent with every `NBD_OPT_INFO`/`GO` answer,
//!   asked for or not, for exports that give one ([`NbdExport::block_size`]).
//!   (It does not stop a QEMU backup job from warning that its NBD target
//!   "doesn't provide information about the block size": QEMU asks the
//!   target node for a cluster size, which its NBD client driver cannot
//!   report whatever the server says; `block/nbd.c` has no
//!   `bdrv_co_get_info` as of QEMU 10.0.)
//! - Reads of an export that cannot be read get `EIO` and the connection
//!   stays up; writes to a read-only export get `EPERM` (their payload is
//!   still read). A read is answered with one chunk (so `NBD_CMD_FLAG_DF`
//!   is always honoured) or, without structured replies, a simple reply.
//! - Requests reaching past the export's end, unknown commands and unknown
//!   command flags get `EINVAL`; a write's payload is still read, so the
//!   stream stays in sync. (`EINVAL` rather than the `ENOSPC` the protocol
//!   suggests for writes past the end: such a write is a client bug, and
//!   QEMU's block jobs may pause and retry on `ENOSPC`.) One exception:
//!   QEMU rounds an export's size up to a multiple of 512 and writes that
//!   rounded tail too, so a write-type request running past the end by
//!   less than that rounding is clipped at the end when the bytes past it
//!   are zero (see [`check_request`]).
//! - Zero-length writes, write-zeroes and trims inside the export succeed
//!   without reaching the export.
//! - A write longer than [`wire::MAX_PAYLOAD`] (the advertised maximum block
//!   size), a request with a bad magic or a malformed handshake closes the
//!   connection.
//! - `NBD_CMD_FLAG_FUA` and `NBD_CMD_FLAG_NO_HOLE` are accepted and change
//!   nothing. FUA is not advertised, so QEMU sends a flush instead.
//! - Sizes and offsets are bytes: the minimum block size is 1, so unaligned
//!   writes reach the export exactly as the client sent them.
//! - Read-only exports are marked `NBD_FLAG_CAN_MULTI_CONN`: every
//!   connection sees the same bytes.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::tls::{self, TlsServerConfig};
use crate::wire;

/// Which operations an export serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportFlags {
    /// `NBD_CMD_READ` (and block status) are served.
    pub readable: bool,
    /// Writes, write-zeroes and trims are accepted; without, the export is
    /// announced read-only.
    pub writable: bool,
}

impl ExportFlags {
    /// A backup target: written, never read.
    pub const WRITE_ONLY: ExportFlags = ExportFlags {
        readable: false,
        writable: true,
    };
    /// A view: read, never written.
    pub const READ_ONLY: ExportFlags = ExportFlags {
        readable: true,
        writable: false,
    };
}

/// Block size constraints announced with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Requests start and end on multiples of this (a power of two).
    pub min: u32,
    /// What the export prefers.
    pub preferred: u32,
    /// Longest request payload (at most [`wire::MAX_PAYLOAD`]).
    pub max: u32,
}

impl BlockSize {
    /// Any byte offset and length, 64 KiB preferred, 32 MiB at most.
    pub const BYTES: BlockSize = BlockSize {
        min: wire::MIN_BLOCK,
        preferred: wire::PREFERRED_BLOCK,
        max: wire::MAX_PAYLOAD,
    };
}

/// One stretch of a block status answer: `len` bytes with the context's
/// status `flags` (for `base:allocation`: [`wire::STATE_HOLE`],
/// [`wire::STATE_ZERO`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub len: u64,
    /// Status bits of the metadata context.
    pub flags: u32,
}

/// What the server serves under one export name. Called from the server's
/// threads, possibly from several connections at once. Only the
/// operations [`NbdExport::flags`] allows are called; the others answer
/// with an error by default.
pub trait NbdExport: Send + Sync + 'static {
    /// Size in bytes; any value, not necessarily a multiple of 512.
    fn size(&self) -> u64;

    /// Whether the export can be read and written.
    fn flags(&self) -> ExportFlags;

    /// Block sizes to announce; `None` sends no `NBD_INFO_BLOCK_SIZE`.
    fn block_size(&self) -> Option<BlockSize> {
        Some(BlockSize::BYTES)
    }

    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Store `data` at byte `offset` of the export.
    fn write(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    /// Store `len` zero bytes at byte `offset`.
    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    /// The client no longer needs `len` bytes at `offset`. Default: ignored.
    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Make every write answered so far durable. Default: nothing to do.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// The metadata contexts the export reports block status in, such as
    /// [`wire::BASE_ALLOCATION`] or `qemu:dirty-bitmap:NAME`.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// The status in `context` (one of [`NbdExport::meta_contexts`]) from
    /// `offset` for up to `len` bytes: extents in order starting at
    /// `offset`, covering at least one byte (more than `len` is cut off).
    fn block_status(
        &self,
        _context: &str,
        _offset: u64,
        _len: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// One export: the name the client asks for (may be empty: the default
/// export) and what serves it.
#[derive(Clone)]
pub struct Export {
    /// Name the client asks for.
    pub name: String,
    /// What serves the requests.
    pub export: Arc<dyn NbdExport>,
}

impl Export {
    /// The export `export` under `name`.
    pub fn new(name: impl Into<String>, export: Arc<dyn NbdExport>) -> Export {
        Export {
            name: name.into(),
            export,
        }
    }
}

/// An NBD server listening on a unix socket (or a TCP address), serving
/// each connection on threads of its own. Dropping it shuts it down like
/// [`NbdServer::shutdown`].
pub struct NbdServer {
    address: Address,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

/// Where a server listens.
#[derive(Debug, Clone)]
enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A listening socket of either kind.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are written whole; do not hold them back.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }
}

/// A client connection of either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    /// The client, for messages.
    fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "a client of the unix socket".into(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "a TCP client".into(), |a| a.to_string()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// State shared by the accept thread, the connections and the server handle.
struct Shared {
    exports: Vec<Export>,
    /// TLS, required of every client when set.
    tls: Option<TlsServerConfig>,
    stop: AtomicBool,
    /// Open connections, so that shutdown can close them.
    connections: Mutex<HashMap<u64, Stream>>,
}

impl NbdServer {
    /// Listen on a unix socket at `path` (created, so nothing may exist
    /// there yet; removed on shutdown) and serve `exports` on an accept thread.
    pub fn bind_unix(path: &Path, exports: Vec<Export>) -> io::Result<NbdServer> {
        let listener = UnixListener::bind(path)?;
        let address = Address::Unix(path.to_path_buf());
        NbdServer::start(Listener::Unix(listener), address, exports, None).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// Listen on TCP at `address` (port 0: any free port, see
    /// [`NbdServer::tcp_address`]) and serve `exports` in plain text: no
    /// TLS, so only for networks where every peer is trusted.
    pub fn bind_tcp(address: SocketAddr, exports: Vec<Export>) -> io::Result<NbdServer> {
        NbdServer::listen_tcp(address, exports, None)
    }

    /// Listen on TCP at `address` and serve `exports` to clients that start
    /// TLS with `tls` first (`NBD_OPT_STARTTLS`); nothing is served in clear.
    pub fn bind_tcp_tls(
        address: SocketAddr,
        exports: Vec<Export>,
        tls: TlsServerConfig,
    ) -> io::Result<NbdServer> {
        NbdServer::listen_tcp(address, exports, Some(tls))
    }

    fn listen_tcp(
        address: SocketAddr,
        exports: Vec<Export>,
        tls: Option<TlsServerConfig>,
    ) -> io::Result<NbdServer> {
        let listener = TcpListener::bind(address)?;
        let bound = listener.local_addr()?;
        NbdServer::start(Listener::Tcp(listener), Address::Tcp(bound), exports, tls)
    }

    fn start(
        listener: Listener,
        address: Address,
        exports: Vec<Export>,
        tls: Option<TlsServerConfig>,
    ) -> io::Result<NbdServer> {
        let shared = Arc::new(Shared {
            exports,
            tls,
            stop: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&listener, &accept_shared))?;
        Ok(NbdServer {
            address,
            shared,
            accept: Some(accept),
        })
    }

    /// Path of the listening unix socket (empty for a TCP server).
    pub fn socket_path(&self) -> &Path {
        match &self.address {
            Address::Unix(path) => path,
            Address::Tcp(_) => Path::new(""),
        }
    }

    /// Address of a TCP server (with the port chosen when bound to port 0).
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        match &self.address {
            Address::Tcp(a) => Some(*a),
            Address::Unix(_) => None,
        }
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
        let woken = match &self.address {
            Address::Unix(path) => UnixStream::connect(path).is_ok(),
            Address::Tcp(a) => {
                let mut a = *a;
                if a.ip().is_unspecified() {
                    a.set_ip(match a {
                        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
                    });
                }
                TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
            }
        };
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
        if let Address::Unix(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
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
fn accept_loop(listener: &Listener, shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return threads;
        }
        let Ok(stream) = accepted else {
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
                let _ = serve_connection(&stream, &conn_shared.exports, conn_shared.tls.as_ref());
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

fn serve_connection(
    stream: &Stream,
    exports: &[Export],
    tls: Option<&TlsServerConfig>,
) -> io::Result<()> {
    let Some(tls) = tls else {
        let mut reader = io::BufReader::with_capacity(READ_BUFFER, stream.try_clone()?);
        return serve(&mut reader, stream.try_clone()?, exports);
    };
    // Before TLS the socket is read unbuffered: no byte of the TLS
    // handshake may be taken for an option.
    let mut clear = stream.try_clone()?;
    let Some(client) = haggle_before_tls(&mut clear, &mut stream.try_clone()?, exports)? else {
        return Ok(());
    };
    let (reader, mut writer) = tls::accept(tls, clear, stream.try_clone()?)
        .inspect_err(|e| tls.refused(&stream.peer(), e))?;
    let mut reader = io::BufReader::with_capacity(READ_BUFFER, reader);
    let result = match haggle(&mut reader, &mut writer, exports, client, TlsPhase::Active)? {
        Haggled::Session(session) => transmission(
            &mut reader,
            writer.clone(),
            &exports[session.index],
            &session,
        ),
        Haggled::StartTls | Haggled::Ended => Ok(()),
    };
    writer.close();
    result
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
        Some(session) => transmission(reader, writer, &exports[session.index], &session),
        None => Ok(()),
    }
}

fn protocol_error(e: wire::WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Longest option payload the server reads into memory.
const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Transmission flags of `export` on a connection with or without
/// structured replies.
fn transmission_flags(export: &dyn NbdExport, structured: bool) -> u16 {
    let access = export.flags();
    let mut flags = wire::FLAG_HAS_FLAGS | wire::FLAG_SEND_FLUSH;
    if access.writable {
        flags |= wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES;
    } else {
        flags |= wire::FLAG_READ_ONLY | wire::FLAG_CAN_MULTI_CONN;
    }
    if access.readable && structured {
        flags |= wire::FLAG_SEND_DF;
    }
    flags
}

/// Metadata contexts chosen on a connection: (id, name).
type Contexts = Vec<(u32, String)>;

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    /// The chosen export.
    index: usize,
    /// Structured replies were negotiated.
    structured: bool,
    /// Metadata contexts chosen for block status: (id, name).
    contexts: Contexts,
}

/// The option haggling of one connection.
struct Negotiation<'e> {
    exports: &'e [Export],
    /// Whether structured replies and metadata contexts are offered.
    offers_structured: bool,
    structured: bool,
    /// `NBD_OPT_SET_META_CONTEXT`'s choice: the export name it was for and
    /// the contexts.
    contexts: Option<(Vec<u8>, Contexts)>,
}

impl Negotiation<'_> {
    fn find(&self, name: &[u8]) -> Option<usize> {
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    /// The session of export `index`, keeping the contexts chosen for it.
    fn session(&mut self, index: usize) -> Session {
        let name = self.exports[index].name.as_bytes();
        let contexts = match self.contexts.take() {
            Some((for_name, contexts)) if for_name == name => contexts,
            _ => Vec::new(),
        };
        Session {
            index,
            structured: self.structured,
            contexts,
        }
    }

    fn parses(&self, option: u32) -> bool {
        match option {
            wire::OPT_EXPORT_NAME | wire::OPT_INFO | wire::OPT_GO | wire::OPT_LIST => true,
            wire::OPT_STRUCTURED_REPLY
            | wire::OPT_SET_META_CONTEXT
            | wire::OPT_LIST_META_CONTEXT => self.offers_structured,
            _ => false,
        }
    }

    /// The replies to `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then an ack.
    fn list(&self, data: &[u8]) -> Vec<u8> {
        if !data.is_empty() {
            return wire::encode_option_reply(wire::OPT_LIST, wire::REP_ERR_INVALID, &[]);
        }
        let mut out = Vec::new();
        for export in self.exports {
            let payload = wire::encode_server_reply(export.name.as_bytes());
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

    /// The replies to `NBD_OPT_INFO` or `NBD_OPT_GO`, and the export they
    /// describe. The block sizes are sent whether asked for or not, as the
    /// protocol allows.
    fn info(&self, option: u32, data: &[u8]) -> (Vec<u8>, Option<usize>) {
        let Ok(request) = wire::decode_info_request(data) else {
            return (
                wire::encode_option_reply(option, wire::REP_ERR_INVALID, &[]),
                None,
            );
        };
        let Some(index) = self.find(request.name) else {
            let message = b"no export of that name";
            return (
                wire::encode_option_reply(option, wire::REP_ERR_UNKNOWN, message),
                None,
            );
        };
        let export = &*self.exports[index].export;
        let flags = transmission_flags(export, self.structured);
        let info = wire::encode_info_export(export.size(), flags);
        let mut out = wire::encode_option_reply(option, wire::REP_INFO, &info);
        if let Some(b) = export.block_size() {
            let sizes = wire::encode_info_block_size(b.min, b.preferred, b.max);
            out.extend(wire::encode_option_reply(option, wire::REP_INFO, &sizes));
        }
        out.extend(wire::encode_option_reply(option, wire::REP_ACK, &[]));
        (out, Some(index))
    }

    /// `NBD_OPT_STRUCTURED_REPLY`.
    fn structured_reply(&mut self, data: &[u8]) -> Vec<u8> {
        let option = wire::OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return wire::encode_option_reply(option, wire::REP_ERR_INVALID, &[]);
        }
        self.structured = true;
        wire::encode_option_reply(option, wire::REP_ACK, &[])
    }

    /// `NBD_OPT_SET_META_CONTEXT` (`set`) or `NBD_OPT_LIST_META_CONTEXT`:
    /// one `NBD_REP_META_CONTEXT` per matching context, then an ack. Set
    /// takes exact names; list also takes `namespace:` prefixes, and no
    /// query at all lists every context.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> Vec<u8> {
        let set = option == wire::OPT_SET_META_CONTEXT;
        let invalid = || wire::encode_option_reply(option, wire::REP_ERR_INVALID, &[]);
        if set && !self.structured {
            return invalid();
        }
        let Ok(request) = wire::decode_meta_context_request(data) else {
            return invalid();
        };
        let Some(index) = self.find(request.name) else {
            return wire::encode_option_reply(option, wire::REP_ERR_UNKNOWN, &[]);
        };
        let available = self.exports[index].export.meta_contexts();
        let mut chosen = Vec::new();
        for (i, name) in available.iter().enumerate() {
            let wanted = request.queries.iter().any(|q| {
                *q == name.as_bytes()
                    || (!set && q.ends_with(b":") && name.as_bytes().starts_with(q))
            });
            if wanted || (!set && request.queries.is_empty()) {
                let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
                chosen.push((id, name.clone()));
            }
        }
        let mut out = Vec::new();
        for (id, name) in &chosen {
            let payload = wire::encode_meta_context(*id, name.as_bytes());
            out.extend(wire::encode_option_reply(
                option,
                wire::REP_META_CONTEXT,
                &payload,
            ));
        }
        out.extend(wire::encode_option_reply(option, wire::REP_ACK, &[]));
        if set {
            self.contexts = Some((request.name.to_vec(), chosen));
        }
        out
    }
}

/// Option haggling. Returns the session of the chosen export, or `None`
/// when the client ended the session without choosing one.
fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &[Export],
) -> io::Result<Option<Session>> {
    let client = greet(r, w)?;
    match haggle(r, w, exports, client, TlsPhase::Off)? {
        Haggled::Session(session) => Ok(Some(session)),
        Haggled::StartTls | Haggled::Ended => Ok(None),
    }
}

/// Where a connection stands with TLS during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsPhase {
    /// The server has no TLS: `NBD_OPT_STARTTLS` is unsupported.
    Off,
    /// TLS is required and not yet started: only `NBD_OPT_STARTTLS` and
    /// `NBD_OPT_ABORT` are served.
    Required,
    /// TLS is running: everything is served but `NBD_OPT_STARTTLS`.
    Active,
}

/// How option haggling ended.
enum Haggled {
    /// The client chose an export.
    Session(Session),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake follows.
    StartTls,
    /// The client ended the session, or named an export that cannot be served.
    Ended,
}

/// Send the greeting and read the client's flags.
fn greet<R: Read, W: Write>(r: &mut R, w: &mut W) -> io::Result<wire::ClientFlags> {
    w.write_all(&wire::encode_greeting())?;
    w.flush()?;
    let mut flags = [0u8; wire::CLIENT_FLAGS_LEN];
    r.read_exact(&mut flags)?;
    wire::decode_client_flags(&flags).map_err(protocol_error)
}

/// The part of a TLS-only server's handshake before TLS: the greeting, then
/// options until `NBD_OPT_STARTTLS`, each other option refused with
/// `NBD_REP_ERR_TLS_REQD`. Returns the client's flags once `NBD_OPT_STARTTLS`
/// has been acknowledged (the TLS handshake comes next), `None` when the
/// client ended the session. Nothing about the exports is sent.
pub fn haggle_before_tls<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &[Export],
) -> io::Result<Option<wire::ClientFlags>> {
    let client = greet(r, w)?;
    match haggle(r, w, exports, client, TlsPhase::Required)? {
        Haggled::StartTls => Ok(Some(client)),
        Haggled::Session(_) | Haggled::Ended => Ok(None),
    }
}

/// Options until the client chooses an export, ends the session or (in
/// [`TlsPhase::Required`]) starts TLS.
fn haggle<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &[Export],
    client: wire::ClientFlags,
    tls: TlsPhase,
) -> io::Result<Haggled> {
    let mut n = Negotiation {
        exports,
        offers_structured: exports
            .iter()
            .any(|e| e.export.flags().readable || !e.export.meta_contexts().is_empty()),
        structured: false,
        contexts: None,
    };
    loop {
        let mut head = [0u8; wire::OPTION_HEADER_LEN];
        r.read_exact(&mut head)?;
        let opt = wire::decode_option_header(&head).map_err(protocol_error)?;
        let tls_reply = match (tls, opt.option) {
            (TlsPhase::Off, _) | (_, wire::OPT_ABORT) => None,
            (TlsPhase::Required, wire::OPT_STARTTLS) if opt.len == 0 => Some(wire::REP_ACK),
            (_, wire::OPT_STARTTLS) => Some(wire::REP_ERR_INVALID),
            (TlsPhase::Required, _) => Some(wire::REP_ERR_TLS_REQD),
            (TlsPhase::Active, _) => None,
        };
        if tls_reply.is_some() || !n.parses(opt.option) || opt.len > MAX_OPTION_DATA {
            io::copy(&mut r.by_ref().take(u64::from(opt.len)), &mut io::sink())?;
            let reply = match (tls_reply, opt.option) {
                // Cannot be answered with an error.
                (_, wire::OPT_EXPORT_NAME) => return Ok(Haggled::Ended),
                (Some(reply), _) => reply,
                (None, wire::OPT_ABORT) => wire::REP_ACK,
                (None, o) if n.parses(o) => wire::REP_ERR_INVALID,
                (None, _) => wire::REP_ERR_UNSUP,
            };
            w.write_all(&wire::encode_option_reply(opt.option, reply, &[]))?;
            w.flush()?;
            match (opt.option, reply) {
                (wire::OPT_ABORT, _) => return Ok(Haggled::Ended),
                (wire::OPT_STARTTLS, wire::REP_ACK) => return Ok(Haggled::StartTls),
                _ => continue,
            }
        }
        let mut data = vec![0u8; opt.len as usize];
        r.read_exact(&mut data)?;
        if opt.option == wire::OPT_EXPORT_NAME {
            let Some(index) = n.find(&data) else {
                return Ok(Haggled::Ended); // The protocol has no error reply here.
            };
            let export = &*exports[index].export;
            let flags = transmission_flags(export, n.structured);
            let reply = wire::encode_export_name_reply(export.size(), flags, client.no_zeroes);
            w.write_all(&reply)?;
            w.flush()?;
            return Ok(Haggled::Session(n.session(index)));
        }
        let (replies, found) = match opt.option {
            wire::OPT_LIST => (n.list(&data), None),
            wire::OPT_STRUCTURED_REPLY => (n.structured_reply(&data), None),
            wire::OPT_SET_META_CONTEXT | wire::OPT_LIST_META_CONTEXT => {
                (n.meta_context(opt.option, &data), None)
            }
            _ => n.info(opt.option, &data),
        };
        w.write_all(&replies)?;
        w.flush()?;
        if let (wire::OPT_GO, Some(index)) = (opt.option, found) {
            return Ok(Haggled::Session(n.session(index)));
        }
    }
}

/// What the server does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
    },
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
    /// Report block status of `len` bytes at `offset`.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
        /// One descriptor per context is enough (`NBD_CMD_FLAG_REQ_ONE`).
        one: bool,
    },
    /// Flush the export.
    Flush,
    /// End the connection without a reply.
    Disconnect,
    /// Reply with this error code without touching the export (0: success).
    Reply(u32),
}

/// Decide what to do with a request to an export of `size` bytes that
/// serves `access`, on a connection that negotiated block status
/// (`status`); `payload` is a write's data (empty for other commands).
///
/// QEMU's block layer rounds sizes up to 512 bytes, so for an export
/// whose size is not a multiple of 512 it sends writes that run into
/// that rounded tail. Such a write is clipped at the export's end when
/// the part past the end is all zero (always so for write-zeroes and
/// trim); any other request past the end gets `EINVAL`.
pub fn check_request(
    request: &wire::Request,
    payload: &[u8],
    size: u64,
    access: ExportFlags,
    status: bool,
) -> Action {
    let (offset, len) = (request.offset, u64::from(request.len));
    let inside = offset.checked_add(len).is_some_and(|end| end <= size);
    match request.kind {
        wire::CMD_DISC => return Action::Disconnect,
        wire::CMD_FLUSH => return Action::Flush,
        wire::CMD_READ if !access.readable => return Action::Reply(wire::EIO),
        wire::CMD_READ => {
            let known = wire::CMD_FLAG_FUA | wire::CMD_FLAG_DF;
            if request.flags & !known != 0 || !inside || request.len > wire::MAX_PAYLOAD {
                return Action::Reply(wire::EINVAL);
            }
            return Action::Read {
                offset,
                len: request.len,
            };
        }
        wire::CMD_BLOCK_STATUS => {
            if !status || request.flags & !wire::CMD_FLAG_REQ_ONE != 0 || len == 0 || !inside {
                return Action::Reply(wire::EINVAL);
            }
            return Action::BlockStatus {
                offset,
                len: request.len,
                one: request.flags & wire::CMD_FLAG_REQ_ONE != 0,
            };
        }
        wire::CMD_WRITE | wire::CMD_WRITE_ZEROES | wire::CMD_TRIM => {}
        _ => return Action::Reply(wire::EINVAL),
    }
    if !access.writable {
        return Action::Reply(wire::EPERM);
    }
    if request.flags & !(wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE) != 0 {
        return Action::Reply(wire::EINVAL);
    }
    let Some(end) = offset.checked_add(len) else {
        return Action::Reply(wire::EINVAL);
    };
    let sector_end = size.checked_next_multiple_of(512).unwrap_or(size);
    if end > sector_end {
        return Action::Reply(wire::EINVAL);
    }
    // Bytes inside the export; the rest lies in QEMU's rounded tail.
    let keep = size.saturating_sub(offset).min(len);
    if request.kind == wire::CMD_WRITE {
        let Some(past_end) = payload.get(keep as usize..) else {
            return Action::Reply(wire::EINVAL);
        };
        if payload.len() as u64 != len || past_end.iter().any(|&b| b != 0) {
            return Action::Reply(wire::EINVAL);
        }
    }
    if keep == 0 {
        return Action::Reply(0);
    }
    match request.kind {
        wire::CMD_WRITE => Action::Write { offset, len: keep },
        wire::CMD_WRITE_ZEROES => Action::WriteZeroes { offset, len: keep },
        _ => Action::Trim { offset, len: keep },
    }
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

/// One request for the worker: what to do, the cookie to answer with and
/// whether the answer is a structured reply.
struct Job<'a> {
    cookie: u64,
    structured: bool,
    op: Op<'a>,
}

enum Op<'a> {
    Write {
        offset: u64,
        data: Vec<u8>,
        _reserved: Reservation<'a>,
    },
    Other(Action),
}

/// How a request was answered: an error code (0: success) and, for a
/// successful read or block status, what the reply carries.
enum Outcome {
    Code(u32, String),
    Data(u64, Vec<u8>),
    Status(Vec<(u32, Vec<(u32, u32)>)>),
}

impl Op<'_> {
    /// Run the operation against `export`.
    fn execute(&self, export: &dyn NbdExport, session: &Session) -> Outcome {
        let action = match self {
            Op::Write { offset, data, .. } => return done(export.write(*offset, data)),
            Op::Other(action) => *action,
        };
        match action {
            Action::WriteZeroes { offset, len } => done(export.write_zeroes(offset, len)),
            Action::Trim { offset, len } => done(export.trim(offset, len)),
            Action::Flush => done(export.flush()),
            Action::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                match export.read(offset, &mut buf) {
                    Ok(()) => Outcome::Data(offset, buf),
                    Err(e) => failed(&e),
                }
            }
            Action::BlockStatus { offset, len, one } => {
                let mut chunks = Vec::new();
                for (id, name) in &session.contexts {
                    match status_descriptors(export, name, offset, len, one) {
                        Ok(d) => chunks.push((*id, d)),
                        Err(e) => return failed(&e),
                    }
                }
                Outcome::Status(chunks)
            }
            Action::Reply(code) => Outcome::Code(code, String::new()),
            Action::Write { .. } | Action::Disconnect => Outcome::Code(wire::EINVAL, String::new()),
        }
    }
}

fn done(result: io::Result<()>) -> Outcome {
    match result {
        Ok(()) => Outcome::Code(0, String::new()),
        Err(e) => failed(&e),
    }
}

fn failed(e: &io::Error) -> Outcome {
    Outcome::Code(wire::error_code(e), e.to_string())
}

/// Block status descriptors of `context` for `len` bytes at `offset`: the
/// export's extents, cut to the request (and to one with `one`).
fn status_descriptors(
    export: &dyn NbdExport,
    context: &str,
    offset: u64,
    len: u32,
    one: bool,
) -> io::Result<Vec<(u32, u32)>> {
    let extents = export.block_status(context, offset, u64::from(len))?;
    let mut left = len;
    let mut out = Vec::new();
    for e in extents {
        let n = u32::try_from(e.len).unwrap_or(u32::MAX).min(left);
        if n == 0 {
            continue;
        }
        out.push((n, e.flags));
        left -= n;
        if left == 0 || one {
            break;
        }
    }
    if out.is_empty() {
        return Err(io::Error::other(format!(
            "no block status in {context} at offset {offset}"
        )));
    }
    Ok(out)
}

/// The reply bytes of `outcome` for the request with `cookie`.
fn encode_reply(cookie: u64, structured: bool, outcome: Outcome) -> Vec<u8> {
    let last = wire::REPLY_FLAG_DONE;
    match (structured, outcome) {
        (false, Outcome::Code(code, _)) => wire::encode_simple_reply(code, cookie).to_vec(),
        (false, Outcome::Data(_, data)) => {
            let mut out = wire::encode_simple_reply(0, cookie).to_vec();
            out.extend_from_slice(&data);
            out
        }
        // Block status needs structured replies (check_request saw to it).
        (false, Outcome::Status(_)) => wire::encode_simple_reply(wire::EINVAL, cookie).to_vec(),
        (true, Outcome::Code(0, _)) => wire::encode_chunk(last, wire::REPLY_TYPE_NONE, cookie, &[]),
        // A chunk of data carries at least one byte.
        (true, Outcome::Data(_, data)) if data.is_empty() => {
            wire::encode_chunk(last, wire::REPLY_TYPE_NONE, cookie, &[])
        }
        (true, Outcome::Code(code, message)) => {
            let payload = wire::encode_error_chunk(code, &message, None);
            wire::encode_chunk(last, wire::REPLY_TYPE_ERROR, cookie, &payload)
        }
        (true, Outcome::Data(offset, data)) => {
            let header = wire::encode_offset_data_header(last, cookie, offset, data.len());
            let mut out = Vec::with_capacity(header.len() + data.len());
            out.extend_from_slice(&header);
            out.extend_from_slice(&data);
            out
        }
        (true, Outcome::Status(chunks)) => {
            let mut out = Vec::new();
            for (id, descriptors) in chunks {
                let payload = wire::encode_block_status(id, &descriptors);
                out.extend(wire::encode_chunk(
                    0,
                    wire::REPLY_TYPE_BLOCK_STATUS,
                    cookie,
                    &payload,
                ));
            }
            out.extend(wire::encode_chunk(last, wire::REPLY_TYPE_NONE, cookie, &[]));
            out
        }
    }
}

/// The transmission phase: requests are read here, run and answered on a
/// worker thread. Returns when the client disconnects or breaks the protocol.
fn transmission<R: Read, W: Write + Send>(
    reader: &mut R,
    out: W,
    export: &Export,
    session: &Session,
) -> io::Result<()> {
    let budget = Budget::new(QUEUE_BYTES);
    let (jobs, queue) = crossbeam_channel::bounded(QUEUE_LEN);
    thread::scope(|scope| {
        let served = &*export.export;
        let budget = &budget;
        let worker = thread::Builder::new()
            .name("nbd-reply".into())
            .spawn_scoped(scope, move || {
                reply_worker(queue, served, session, out, budget)
            })?;
        let result = read_requests(reader, served, session, &jobs, budget);
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
    export: &dyn NbdExport,
    session: &Session,
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
        let outcome = job.op.execute(export, session);
        drop(job.op);
        let reply = encode_reply(job.cookie, job.structured, outcome);
        if out.write_all(&reply).and_then(|()| out.flush()).is_err() {
            replying = false;
            budget.close();
        }
    }
}

fn read_requests<'a, R: Read>(
    reader: &mut R,
    export: &dyn NbdExport,
    session: &Session,
    jobs: &Sender<Job<'a>>,
    budget: &'a Budget,
) -> io::Result<()> {
    let (size, access) = (export.size(), export.flags());
    let status = !session.contexts.is_empty();
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
        let action = check_request(&request, data, size, access, status);
        let op = match (action, payload) {
            (Action::Disconnect, _) => return Ok(()),
            (Action::Write { len, .. }, Some((mut data, reserved))) => {
                data.truncate(len as usize);
                Op::Write {
                    offset: request.offset,
                    data,
                    _reserved: reserved,
                }
            }
            (Action::Write { .. }, None) => Op::Other(Action::Reply(wire::EINVAL)),
            (action, _) => Op::Other(action),
        };
        let structured =
            session.structured && matches!(request.kind, wire::CMD_READ | wire::CMD_BLOCK_STATUS);
        let job = Job {
            cookie: request.cookie,
            structured,
            op,
        };
        if jobs.send(job).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::{info_data, request};
    use crate::wire::*;
    use std::io::Cursor;

    /// A write-only export (a backup target).
    const TARGET: ExportFlags = ExportFlags::WRITE_ONLY;

    /// What a backup target announces.
    const TRANSMISSION_FLAGS: u16 =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

    /// What the server does with a write of `payload` at `offset` to a
    /// target of `size` bytes.
    fn write_to(size: u64, offset: u64, payload: &[u8]) -> Action {
        let write = request(CMD_WRITE, offset, payload.len() as u32);
        check_request(&write, payload, size, TARGET, false)
    }

    #[test]
    fn check_requests() {
        let size = 3 * 65536 + 512;
        let check = |kind, offset, len| {
            check_request(&request(kind, offset, len), &[], size, TARGET, false)
        };
        let write = |offset, payload: &[u8]| write_to(size, offset, payload);
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
            check_request(&request(CMD_WRITE, 0, 10), &[1; 9], size, TARGET, false),
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
            check_request(&flagged, &[], size, TARGET, false),
            Action::WriteZeroes {
                offset: 0,
                len: 512
            }
        );
        flagged.flags |= 1 << 4;
        assert_eq!(
            check_request(&flagged, &[], size, TARGET, false),
            Action::Reply(EINVAL)
        );
    }

    #[test]
    fn check_requests_in_the_rounded_tail() {
        let size = 1000;
        let write = |offset, payload: &[u8]| write_to(size, offset, payload);
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
        let zero = check_request(
            &request(CMD_WRITE_ZEROES, 0, 1024),
            &[],
            size,
            TARGET,
            false,
        );
        assert_eq!(
            zero,
            Action::WriteZeroes {
                offset: 0,
                len: 1000
            }
        );
        let trim = check_request(&request(CMD_TRIM, 1000, 24), &[], size, TARGET, false);
        assert_eq!(trim, Action::Reply(0));
        let past = check_request(&request(CMD_TRIM, 1000, 25), &[], size, TARGET, false);
        assert_eq!(past, Action::Reply(EINVAL));
        // No overflow at the top of the range.
        let top = check_request(
            &request(CMD_TRIM, u64::MAX - 1, 1),
            &[],
            u64::MAX,
            TARGET,
            false,
        );
        assert_eq!(
            top,
            Action::Trim {
                offset: u64::MAX - 1,
                len: 1
            }
        );
    }

    /// Records what reaches it.
    struct Log(Mutex<Vec<String>>, u64);

    impl NbdExport for Log {
        fn size(&self) -> u64 {
            self.1
        }
        fn flags(&self) -> ExportFlags {
            TARGET
        }
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
        let log = Arc::new(Log(Mutex::default(), size));
        (Export::new(name, log.clone()), log)
    }

    /// The session of a connection that chose the first export without
    /// structured replies.
    fn plain() -> Session {
        Session {
            index: 0,
            structured: false,
            contexts: Vec::new(),
        }
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

    /// (option, reply type) of each of `replies`.
    fn reply_kinds(replies: &[(u32, u32, Vec<u8>)]) -> Vec<(u32, u32)> {
        replies.iter().map(|r| (r.0, r.1)).collect()
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
        assert_eq!(chosen.map(|s| s.index), Some(0));
        assert_eq!(&out[..18], &encode_greeting());
        let replies = option_replies(&out[18..]);
        let kinds = reply_kinds(&replies);
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
            assert_eq!(chosen.map(|s| s.index), Some(0));
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
    fn tls_only_refuses_every_option_before_starttls() {
        let (e, log) = export("disk", 1000);
        let mut input = vec![0, 0, 0, 3];
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(OPT_INFO, &info_data(b"disk", &[])));
        input.extend(option(OPT_GO, &info_data(b"disk", &[])));
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_STARTTLS, b"x"));
        input.extend(option(0x1234, b"whatever"));
        input.extend(option(OPT_STARTTLS, &[]));
        // What follows STARTTLS is the TLS handshake: left unread.
        input.extend(b"\x16\x03\x01");
        let mut out = Vec::new();
        let mut r = Cursor::new(input);
        let client = haggle_before_tls(&mut r, &mut out, std::slice::from_ref(&e)).unwrap();
        assert_eq!(client, Some(ClientFlags { no_zeroes: true }));
        assert_eq!(r.position() as usize, r.get_ref().len() - 3);
        assert_eq!(&out[..18], &encode_greeting());
        let replies = option_replies(&out[18..]);
        assert!(replies.iter().all(|r| r.2.is_empty()), "{replies:?}");
        assert_eq!(
            reply_kinds(&replies),
            vec![
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_INFO, REP_ERR_TLS_REQD),
                (OPT_GO, REP_ERR_TLS_REQD),
                (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ERR_INVALID),
                (0x1234, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ACK),
            ]
        );
        // EXPORT_NAME cannot be refused: the connection ends, nothing sent.
        let mut input = vec![0, 0, 0, 1];
        input.extend(option(OPT_EXPORT_NAME, b"disk"));
        let mut out = Vec::new();
        let ended = haggle_before_tls(&mut Cursor::new(input), &mut out, &[e]).unwrap();
        assert_eq!((ended, out.len()), (None, 18));
        assert!(lock(&log.0).is_empty());
    }

    #[test]
    fn starttls_without_tls_is_unsupported_and_twice_is_invalid() {
        let (e, _) = export("disk", 1000);
        let mut input = vec![0, 0, 0, 3];
        input.extend(option(OPT_STARTTLS, &[]));
        input.extend(option(OPT_ABORT, &[]));
        let mut out = Vec::new();
        assert_eq!(
            handshake(&mut Cursor::new(input), &mut out, std::slice::from_ref(&e)).unwrap(),
            None
        );
        assert_eq!(
            reply_kinds(&option_replies(&out[18..])),
            vec![(OPT_STARTTLS, REP_ERR_UNSUP), (OPT_ABORT, REP_ACK)]
        );
        let mut input = option(OPT_STARTTLS, &[]);
        input.extend(option(OPT_GO, &info_data(b"disk", &[])));
        let mut out = Vec::new();
        let client = ClientFlags { no_zeroes: true };
        let haggled = haggle(
            &mut Cursor::new(input),
            &mut out,
            &[e],
            client,
            TlsPhase::Active,
        )
        .unwrap();
        assert!(matches!(
            haggled,
            Haggled::Session(Session { index: 0, .. })
        ));
        assert_eq!(
            reply_kinds(&option_replies(&out))[..2],
            [(OPT_STARTTLS, REP_ERR_INVALID), (OPT_GO, REP_INFO)]
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
        transmission(&mut Cursor::new(input), &mut out, &e, &plain()).unwrap();
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
        assert!(transmission(&mut Cursor::new(bad), Vec::new(), &e, &plain()).is_err());
        let huge = write(MAX_PAYLOAD + 1).to_vec();
        assert!(transmission(&mut Cursor::new(huge), Vec::new(), &e, &plain()).is_err());
        let mut short = write(100).to_vec();
        short.extend_from_slice(&[1; 99]);
        assert!(transmission(&mut Cursor::new(short), Vec::new(), &e, &plain()).is_err());
        let partial = write(1)[..20].to_vec();
        assert!(transmission(&mut Cursor::new(partial), Vec::new(), &e, &plain()).is_err());
        assert!(lock(&log.0).is_empty());
    }

    /// A read-only view of 8 KiB: bytes `i as u8` in the first 4 KiB,
    /// zeros after; `base:allocation` and a dirty bitmap context.
    struct View;

    impl NbdExport for View {
        fn size(&self) -> u64 {
            8192
        }
        fn flags(&self) -> ExportFlags {
            ExportFlags::READ_ONLY
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = offset + i as u64;
                *b = if at < 4096 { at as u8 } else { 0 };
            }
            Ok(())
        }
        fn meta_contexts(&self) -> Vec<String> {
            vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:b0".into()]
        }
        fn block_status(
            &self,
            context: &str,
            offset: u64,
            _: u64,
        ) -> io::Result<Vec<StatusExtent>> {
            assert_eq!(context, BASE_ALLOCATION);
            Ok(if offset < 4096 {
                vec![
                    StatusExtent {
                        len: 4096 - offset,
                        flags: 0,
                    },
                    StatusExtent {
                        len: 4096,
                        flags: STATE_HOLE | STATE_ZERO,
                    },
                ]
            } else {
                vec![StatusExtent {
                    len: 8192 - offset,
                    flags: STATE_HOLE | STATE_ZERO,
                }]
            })
        }
    }

    fn meta_data(name: &[u8], queries: &[&str]) -> Vec<u8> {
        encode_meta_context_request(name, queries)
    }

    #[test]
    fn views_offer_structured_replies_and_metadata_contexts() {
        let e = Export::new("v", Arc::new(View));
        let mut input = vec![0, 0, 0, 3];
        // Before structured replies, setting contexts is invalid.
        input.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data(b"v", &[BASE_ALLOCATION]),
        ));
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_LIST_META_CONTEXT, &meta_data(b"v", &[])));
        input.extend(option(OPT_LIST_META_CONTEXT, &meta_data(b"v", &["qemu:"])));
        input.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data(b"nope", &[BASE_ALLOCATION]),
        ));
        input.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_data(b"v", &[BASE_ALLOCATION, "x:y"]),
        ));
        input.extend(option(OPT_GO, &info_data(b"v", &[])));
        let mut out = Vec::new();
        let session = handshake(&mut Cursor::new(input), &mut out, &[e]).unwrap();
        assert_eq!(
            session,
            Some(Session {
                index: 0,
                structured: true,
                contexts: vec![(1, BASE_ALLOCATION.into())],
            })
        );
        let replies = option_replies(&out[18..]);
        let kinds = reply_kinds(&replies);
        assert_eq!(
            kinds,
            vec![
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
                (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
                (OPT_LIST_META_CONTEXT, REP_ACK),
                (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
                (OPT_LIST_META_CONTEXT, REP_ACK),
                (OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN),
                (OPT_SET_META_CONTEXT, REP_META_CONTEXT),
                (OPT_SET_META_CONTEXT, REP_ACK),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(
            decode_meta_context(&replies[5].2).unwrap(),
            (2, &b"qemu:dirty-bitmap:b0"[..])
        );
        let read_only =
            FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN | FLAG_SEND_DF;
        assert_eq!(replies[10].2, encode_info_export(8192, read_only));
    }

    /// Splits structured replies into (flags, type, cookie, payload).
    fn chunks_of(mut bytes: &[u8]) -> Vec<(u16, u16, u64, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let Ok(ReplyHeader::Structured {
                flags,
                kind,
                cookie,
                len,
            }) = decode_reply_header(bytes)
            else {
                panic!("not a structured reply: {bytes:?}");
            };
            let end = STRUCTURED_REPLY_LEN + len as usize;
            out.push((
                flags,
                kind,
                cookie,
                bytes[STRUCTURED_REPLY_LEN..end].to_vec(),
            ));
            bytes = &bytes[end..];
        }
        out
    }

    #[test]
    fn views_answer_reads_and_block_status_in_chunks() {
        let e = Export::new("v", Arc::new(View));
        let session = Session {
            index: 0,
            structured: true,
            contexts: vec![(1, BASE_ALLOCATION.into())],
        };
        let mut input = Vec::new();
        let mut push = |kind, flags, cookie, offset, len| {
            input.extend_from_slice(&encode_request(&Request {
                flags,
                kind,
                cookie,
                offset,
                len,
            }));
        };
        push(CMD_READ, CMD_FLAG_DF, 1, 4000, 200);
        push(CMD_READ, 0, 2, 8000, 200); // past the end
        push(CMD_BLOCK_STATUS, 0, 3, 100, 8000);
        push(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 100, 8000);
        push(CMD_READ, 0, 5, 0, 0);
        push(CMD_DISC, 0, 6, 0, 0);
        let mut out = Vec::new();
        transmission(&mut Cursor::new(input), &mut out, &e, &session).unwrap();
        // A write to a view is refused, its payload read.
        let mut write = encode_request(&request(CMD_WRITE, 0, 4)).to_vec();
        write.extend_from_slice(b"data");
        write.extend_from_slice(&encode_request(&request(CMD_DISC, 0, 0)));
        let mut refused = Vec::new();
        transmission(&mut Cursor::new(write), &mut refused, &e, &session).unwrap();
        assert_eq!(refused, encode_simple_reply(EPERM, 7));

        let chunks = chunks_of(&out);
        let done = REPLY_FLAG_DONE;
        assert_eq!(chunks[0].0..=chunks[0].1, done..=REPLY_TYPE_OFFSET_DATA);
        let mut data = 4000u64.to_be_bytes().to_vec();
        data.extend((4000..4096).map(|i| i as u8));
        data.extend([0u8; 104]);
        assert_eq!(chunks[0].3, data);
        assert_eq!((chunks[1].1, chunks[1].2), (REPLY_TYPE_ERROR, 2));
        assert_eq!(
            decode_error_chunk(REPLY_TYPE_ERROR, &chunks[1].3)
                .unwrap()
                .code,
            EINVAL
        );
        assert_eq!(
            (chunks[2].0, chunks[2].1, chunks[2].2),
            (0, REPLY_TYPE_BLOCK_STATUS, 3)
        );
        assert_eq!(
            decode_block_status(&chunks[2].3).unwrap(),
            (1, vec![(3996, 0), (4004, STATE_HOLE | STATE_ZERO)])
        );
        assert_eq!((chunks[3].0, chunks[3].1), (done, REPLY_TYPE_NONE));
        assert_eq!(
            decode_block_status(&chunks[4].3).unwrap(),
            (1, vec![(3996, 0)])
        );
        assert_eq!(
            (chunks[5].0, chunks[5].1, chunks[5].2),
            (done, REPLY_TYPE_NONE, 4)
        );
        assert_eq!(
            (chunks[6].0, chunks[6].1, chunks[6].2),
            (done, REPLY_TYPE_NONE, 5)
        );
        assert_eq!(chunks.len(), 7);
    }

    #[test]
    fn block_status_needs_a_negotiated_context() {
        let size = 8192;
        let status = request(CMD_BLOCK_STATUS, 0, 512);
        let view = ExportFlags::READ_ONLY;
        assert_eq!(
            check_request(&status, &[], size, view, false),
            Action::Reply(EINVAL)
        );
        assert_eq!(
            check_request(&status, &[], size, view, true),
            Action::BlockStatus {
                offset: 0,
                len: 512,
                one: false
            }
        );
        let past = request(CMD_BLOCK_STATUS, 8000, 512);
        assert_eq!(
            check_request(&past, &[], size, view, true),
            Action::Reply(EINVAL)
        );
        let read = request(CMD_READ, 0, MAX_PAYLOAD + 1);
        assert_eq!(
            check_request(&read, &[], 1 << 40, view, true),
            Action::Reply(EINVAL)
        );
        let zero = request(CMD_WRITE_ZEROES, 0, 512);
        assert_eq!(
            check_request(&zero, &[], size, view, true),
            Action::Reply(EPERM)
        );
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

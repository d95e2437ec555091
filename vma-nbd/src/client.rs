//! NBD client (fixed newstyle) for reading an export over a unix socket.
//!
//! [`NbdClient::connect_unix`] negotiates structured replies and the
//! `base:allocation` metadata context when the server offers them, then
//! picks the export with `NBD_OPT_GO` (asking for its block sizes). Reads
//! are split into requests of at most [`REQUEST_BYTES`], up to
//! [`MAX_IN_FLIGHT`] of them sent before the replies are collected, in
//! whatever order and however many chunks the server answers with.
//! [`NbdClient::block_status`] reports which stretches read as zeros.
//!
//! Reads ask for one chunk per reply (`NBD_CMD_FLAG_DF`) where the server
//! supports it. Every reply is checked: chunks must lie inside their request, must not
//! overlap, and a successful read must cover every byte asked for. An
//! error reply fails only its request (the stream stays in sync); a
//! malformed reply, a lost connection or a server silent for
//! [`REPLY_TIMEOUT`] ends the connection, and every later call fails with
//! that reason.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::wire::{self, Info, ReplyHeader, WireError};

/// Largest read request sent (the server's maximum, if smaller, wins).
pub const REQUEST_BYTES: u32 = 512 * 1024;

/// Requests sent before their replies are read. Read requests are 28
/// bytes each, so they always fit in the socket buffer and the server is
/// never blocked on replies we do not read yet.
pub const MAX_IN_FLIGHT: usize = 16;

/// How long the server may stay silent while replies are due.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 1 << 20;

/// Longest structured chunk payload other than read data.
const MAX_CHUNK: u32 = 1 << 20;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be opened.
    #[error("cannot connect to the NBD server on {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The handshake failed: the server refused an option or the export.
    #[error("NBD export {export:?} on {socket}: {message}")]
    Handshake {
        /// Export name.
        export: String,
        /// Socket path.
        socket: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("NBD export {export:?}: {what} of bytes {}..{} failed: {}{}", range.start, range.end, wire::error_name(*code), if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        /// Export name.
        export: String,
        /// `read` or `block status`.
        what: &'static str,
        /// Bytes of the request.
        range: Range<u64>,
        /// NBD error code.
        code: u32,
        /// The server's message, if it sent one.
        message: String,
    },
    /// A request outside the export.
    #[error("NBD export {export:?} has {size} bytes; bytes {}..{} are outside it", range.start, range.end)]
    OutOfRange {
        /// Export name.
        export: String,
        /// Export size.
        size: u64,
        /// Bytes asked for.
        range: Range<u64>,
    },
    /// The connection is unusable: the server broke the protocol, went
    /// silent or closed it.
    #[error("NBD export {export:?} on {socket}: connection lost: {reason}")]
    Broken {
        /// Export name.
        export: String,
        /// Socket path.
        socket: PathBuf,
        /// What ended it.
        reason: String,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What `NBD_CMD_BLOCK_STATUS` says of a stretch of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
    /// Not allocated (`NBD_STATE_HOLE`); says nothing about the contents.
    pub hole: bool,
}

/// Block size constraints of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests start and end on multiples of this.
    pub min: u32,
    /// What the server prefers.
    pub preferred: u32,
    /// Longest request payload.
    pub max: u32,
}

/// A connection to one NBD export, for reading. Methods take `&self`; one
/// call at a time uses the connection.
#[derive(Debug)]
pub struct NbdClient {
    conn: Mutex<Conn>,
    export: String,
    socket: PathBuf,
    size: u64,
    flags: u16,
    block: BlockSizes,
    structured: bool,
    allocation: Option<u32>,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    next_cookie: u64,
    broken: Option<String>,
}

/// One request waiting for its reply.
struct Pending<'b> {
    cookie: u64,
    range: Range<u64>,
    kind: PendingKind<'b>,
    /// Byte ranges (relative to the request) the reply has covered.
    covered: Vec<Range<u64>>,
    error: Option<(u32, String)>,
    done: bool,
}

enum PendingKind<'b> {
    Read(&'b mut [u8]),
    Status(Vec<Extent>),
    /// A command whose reply carries no data: write (with its payload),
    /// write zeroes, flush.
    Command(u16, &'b [u8]),
}

impl<'b> Pending<'b> {
    fn new(range: Range<u64>, kind: PendingKind<'b>) -> Pending<'b> {
        Pending {
            cookie: 0,
            range,
            kind,
            covered: Vec::new(),
            error: None,
            done: false,
        }
    }
}

impl NbdClient {
    /// Connect to the NBD server on the unix socket `path` and open the
    /// export `export` (the empty name is the default export).
    pub fn connect_unix(path: &Path, export: &str) -> Result<NbdClient> {
        let connect_error = |source| Error::Connect {
            path: path.to_owned(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_error)?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(connect_error)?;
        let handshake_error = |message: String| Error::Handshake {
            export: export.to_owned(),
            socket: path.to_owned(),
            message,
        };
        let mut hs = Handshake { stream: &stream };
        let negotiated = hs.run(export.as_bytes()).map_err(|e| match e {
            HandshakeError::Io(e) => handshake_error(format!("handshake failed: {e}")),
            HandshakeError::Wire(e) => handshake_error(format!("handshake failed: {e}")),
            HandshakeError::Refused(m) => handshake_error(m),
        })?;
        Ok(NbdClient {
            conn: Mutex::new(Conn {
                stream,
                next_cookie: 1,
                broken: None,
            }),
            export: export.to_owned(),
            socket: path.to_owned(),
            size: negotiated.size,
            flags: negotiated.flags,
            block: negotiated.block,
            structured: negotiated.structured,
            allocation: negotiated.allocation,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Socket the client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the server marks the export read-only.
    pub fn read_only(&self) -> bool {
        self.flags & wire::FLAG_READ_ONLY != 0
    }

    /// The export's block size constraints (defaults where the server
    /// gave none: 1, 4096, 32 MiB).
    pub fn block_sizes(&self) -> BlockSizes {
        self.block
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Whether the server reports `base:allocation` block status.
    pub fn has_block_status(&self) -> bool {
        self.allocation.is_some()
    }

    /// Read `buf.len()` bytes at `offset`, several requests in flight.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        // Requests must start and end on the minimum block size; the end
        // of the export is always allowed.
        let min = u64::from(self.block.min.max(1));
        let start = offset / min * min;
        let stop = end.div_ceil(min).saturating_mul(min).min(self.size);
        if start != offset || stop != end {
            let mut bounce = vec![0u8; (stop - start) as usize];
            self.read_aligned(start, &mut bounce)?;
            let at = (offset - start) as usize;
            buf.copy_from_slice(&bounce[at..at + buf.len()]);
            return Ok(());
        }
        self.read_aligned(offset, buf)
    }

    fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let min = u64::from(self.block.min.max(1));
        let largest = u64::from(REQUEST_BYTES.min(self.block.max.max(1)));
        let piece = (largest / min * min).max(min) as usize;
        let mut conn = self.lock()?;
        let mut at = offset;
        let mut chunks = buf.chunks_mut(piece).peekable();
        while chunks.peek().is_some() {
            let mut batch = Vec::new();
            for chunk in chunks.by_ref().take(MAX_IN_FLIGHT) {
                let len = chunk.len() as u64;
                batch.push(Pending::new(at..at + len, PendingKind::Read(chunk)));
                at += len;
            }
            self.run(&mut conn, &mut batch)?;
            if let Some(p) = batch.into_iter().find(|p| p.error.is_some()) {
                let (code, message) = p.error.expect("found");
                return Err(self.server_error("read", p.range, code, message));
            }
        }
        Ok(())
    }

    /// Allocation status from `offset` for up to `len` bytes: extents in
    /// order, starting at `offset`, covering at least one byte and at most
    /// `len`. Without `base:allocation`, one data extent of `len` bytes.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.allocation.is_none() {
            return Ok(vec![Extent {
                len,
                zero: false,
                hole: false,
            }]);
        }
        let len = (end - offset).min(u64::from(u32::MAX) / 512 * 512).max(1);
        let mut conn = self.lock()?;
        let mut batch = [Pending::new(
            offset..offset + len,
            PendingKind::Status(Vec::new()),
        )];
        self.run(&mut conn, &mut batch)?;
        let [p] = batch;
        if let Some((code, message)) = p.error {
            return Err(self.server_error("block status", p.range, code, message));
        }
        match p.kind {
            PendingKind::Status(extents) if !extents.is_empty() => Ok(extents),
            _ => {
                let reason = format!(
                    "the block status of bytes {}..{} came without descriptors",
                    p.range.start, p.range.end
                );
                Err(self.fail(&mut conn, reason))
            }
        }
    }

    /// Whether the export accepts writes.
    pub fn writable(&self) -> bool {
        !self.read_only()
    }

    /// Write `data` at `offset` (requests of at most [`REQUEST_BYTES`],
    /// several in flight).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let piece = REQUEST_BYTES as usize;
        let mut conn = self.lock()?;
        let mut at = offset;
        let mut chunks = data.chunks(piece).peekable();
        while chunks.peek().is_some() {
            let mut batch = Vec::new();
            for chunk in chunks.by_ref().take(MAX_IN_FLIGHT) {
                let len = chunk.len() as u64;
                batch.push(Pending::new(
                    at..at + len,
                    PendingKind::Command(wire::CMD_WRITE, chunk),
                ));
                at += len;
            }
            self.run(&mut conn, &mut batch)?;
            if let Some(p) = batch.into_iter().find(|p| p.error.is_some()) {
                let (code, message) = p.error.expect("found");
                return Err(self.server_error("write", p.range, code, message));
            }
        }
        Ok(())
    }

    /// Make `len` bytes at `offset` read as zeros (`NBD_CMD_WRITE_ZEROES`,
    /// which lets the server unmap; written as data when the server lacks it).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.flags & wire::FLAG_SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; REQUEST_BYTES as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64);
                self.write_at(at, &zeros[..n as usize])?;
                at += n;
            }
            return Ok(());
        }
        let mut conn = self.lock()?;
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(1 << 30);
            let mut batch = [Pending::new(
                at..at + n,
                PendingKind::Command(wire::CMD_WRITE_ZEROES, &[]),
            )];
            self.run(&mut conn, &mut batch)?;
            let [p] = batch;
            if let Some((code, message)) = p.error {
                return Err(self.server_error("write zeroes", p.range, code, message));
            }
            at += n;
        }
        Ok(())
    }

    /// Ask the server to make every write so far durable (`NBD_CMD_FLUSH`;
    /// nothing to do when the server does not offer it).
    pub fn flush(&self) -> Result<()> {
        if self.flags & wire::FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let mut conn = self.lock()?;
        let mut batch = [Pending::new(
            0..0,
            PendingKind::Command(wire::CMD_FLUSH, &[]),
        )];
        self.run(&mut conn, &mut batch)?;
        let [p] = batch;
        if let Some((code, message)) = p.error {
            return Err(self.server_error("flush", p.range, code, message));
        }
        Ok(())
    }

    /// Send `NBD_CMD_DISC` and close the connection.
    pub fn disconnect(self) {
        self.close();
    }

    fn close(&self) {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.broken.is_none() {
            let request = wire::Request {
                flags: 0,
                kind: wire::CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            let _ = conn.stream.write_all(&wire::encode_request(&request));
            conn.broken = Some("the client disconnected".into());
        }
        let _ = conn.stream.shutdown(Shutdown::Both);
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(Error::OutOfRange {
                export: self.export.clone(),
                size: self.size,
                range: offset..offset.saturating_add(len),
            }),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Conn>> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        match &conn.broken {
            Some(reason) => Err(self.broken(reason.clone())),
            None => Ok(conn),
        }
    }

    fn broken(&self, reason: String) -> Error {
        Error::Broken {
            export: self.export.clone(),
            socket: self.socket.clone(),
            reason,
        }
    }

    fn server_error(
        &self,
        what: &'static str,
        range: Range<u64>,
        code: u32,
        message: String,
    ) -> Error {
        Error::Server {
            export: self.export.clone(),
            what,
            range,
            code,
            message,
        }
    }

    /// Mark the connection unusable and return the error saying why.
    fn fail(&self, conn: &mut Conn, reason: String) -> Error {
        let _ = conn.stream.shutdown(Shutdown::Both);
        conn.broken.get_or_insert(reason.clone());
        self.broken(reason)
    }

    /// Command flags of reads: one chunk per read where the server allows
    /// it. QEMU's server reports a failed read as an error chunk then, but
    /// drops the connection when a fragmented read fails half-way.
    fn read_flags(&self) -> u16 {
        if self.structured && self.flags & wire::FLAG_SEND_DF != 0 {
            wire::CMD_FLAG_DF
        } else {
            0
        }
    }

    /// Send the requests of `pending`, then read replies until every one
    /// is answered; error replies stay in the entries.
    fn run(&self, conn: &mut Conn, pending: &mut [Pending<'_>]) -> Result<()> {
        let mut requests = Vec::with_capacity(pending.len() * wire::REQUEST_LEN);
        for p in pending.iter_mut() {
            p.cookie = conn.next_cookie;
            conn.next_cookie = conn.next_cookie.wrapping_add(1).max(1);
            let (kind, flags) = match p.kind {
                PendingKind::Read(_) => (wire::CMD_READ, self.read_flags()),
                PendingKind::Status(_) => (wire::CMD_BLOCK_STATUS, 0),
                PendingKind::Command(kind, _) => (kind, 0),
            };
            let len = p.range.end - p.range.start;
            requests.extend_from_slice(&wire::encode_request(&wire::Request {
                flags,
                kind,
                cookie: p.cookie,
                offset: p.range.start,
                len: len as u32,
            }));
            if let PendingKind::Command(wire::CMD_WRITE, payload) = p.kind {
                requests.extend_from_slice(payload);
            }
        }
        if let Err(e) = conn.stream.write_all(&requests) {
            return Err(self.fail(conn, format!("sending requests failed: {e}")));
        }
        while pending.iter().any(|p| !p.done) {
            if let Err(reason) = self.receive(conn, pending) {
                return Err(self.fail(conn, reason));
            }
        }
        Ok(())
    }

    /// Read one reply (or chunk) and file it with its request. `Err` means
    /// the connection can no longer be used.
    fn receive(&self, conn: &mut Conn, pending: &mut [Pending<'_>]) -> Result<(), String> {
        let stream = &mut conn.stream;
        let mut head = [0u8; wire::STRUCTURED_REPLY_LEN];
        read_exact(stream, &mut head[..4])?;
        let len = wire::reply_header_len(&head).map_err(|e| e.to_string())?;
        read_exact(stream, &mut head[4..len])?;
        let header = wire::decode_reply_header(&head[..len]).map_err(|e| e.to_string())?;
        let cookie = match header {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Structured { cookie, .. } => cookie,
        };
        let Some(p) = pending.iter_mut().find(|p| p.cookie == cookie && !p.done) else {
            return Err(format!(
                "the server answered cookie {cookie}, which no request waits for"
            ));
        };
        let req_len = p.range.end - p.range.start;
        match header {
            ReplyHeader::Simple { error, .. } => {
                p.done = true;
                if error != 0 {
                    p.error = Some((error, String::new()));
                    return Ok(());
                }
                match &mut p.kind {
                    PendingKind::Read(buf) => read_exact(stream, buf)?,
                    PendingKind::Status(_) => {
                        return Err("a simple reply to a block status request".into())
                    }
                    PendingKind::Command(..) => {}
                }
                p.covered.push(0..req_len);
                Ok(())
            }
            ReplyHeader::Structured {
                flags, kind, len, ..
            } => {
                let done = flags & wire::REPLY_FLAG_DONE != 0;
                self.chunk(stream, p, kind, len)?;
                if done {
                    p.done = true;
                    if p.error.is_none() {
                        if let PendingKind::Read(_) = p.kind {
                            let covered: u64 = p.covered.iter().map(|r| r.end - r.start).sum();
                            if covered != req_len {
                                return Err(format!(
                                    "the read of bytes {}..{} ended with only {covered} bytes sent",
                                    p.range.start, p.range.end
                                ));
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Handle one structured chunk of `len` payload bytes for `p`.
    fn chunk(
        &self,
        stream: &mut UnixStream,
        p: &mut Pending<'_>,
        kind: u16,
        len: u32,
    ) -> Result<(), String> {
        let req_len = p.range.end - p.range.start;
        let small = |stream: &mut UnixStream| -> Result<Vec<u8>, String> {
            if len > MAX_CHUNK {
                return Err(format!("a reply chunk of {len} bytes"));
            }
            let mut payload = vec![0u8; len as usize];
            read_exact(stream, &mut payload)?;
            Ok(payload)
        };
        match (kind, &mut p.kind) {
            (wire::REPLY_TYPE_NONE, _) if len == 0 => Ok(()),
            (wire::REPLY_TYPE_OFFSET_DATA, PendingKind::Read(buf)) => {
                if len < 8 {
                    return Err(format!(
                        "an NBD_REPLY_TYPE_OFFSET_DATA chunk of {len} bytes"
                    ));
                }
                let mut at = [0u8; 8];
                read_exact(stream, &mut at)?;
                let at = wire::Fields::new(&at).u64().map_err(|e| e.to_string())?;
                let rel = place(&p.range, at, u64::from(len - 8), &p.covered)?;
                read_exact(stream, &mut buf[rel.start as usize..rel.end as usize])?;
                p.covered.push(rel);
                Ok(())
            }
            (wire::REPLY_TYPE_OFFSET_HOLE, PendingKind::Read(buf)) => {
                let payload = small(stream)?;
                let (at, hole) = wire::decode_offset_hole(&payload).map_err(|e| e.to_string())?;
                let rel = place(&p.range, at, u64::from(hole), &p.covered)?;
                buf[rel.start as usize..rel.end as usize].fill(0);
                p.covered.push(rel);
                Ok(())
            }
            (wire::REPLY_TYPE_BLOCK_STATUS, PendingKind::Status(extents)) => {
                let payload = small(stream)?;
                let (context, descriptors) =
                    wire::decode_block_status(&payload).map_err(|e| e.to_string())?;
                if Some(context) != self.allocation {
                    return Err(format!(
                        "block status for metadata context {context}, which was not asked for"
                    ));
                }
                if !extents.is_empty() {
                    return Err("a second block status chunk for one request".into());
                }
                let mut total = 0u64;
                for (n, flags) in descriptors {
                    if n == 0 {
                        return Err("a block status descriptor of length 0".into());
                    }
                    // The last descriptor may reach past the request.
                    let n = u64::from(n).min(req_len - total);
                    extents.push(Extent {
                        len: n,
                        zero: flags & wire::STATE_ZERO != 0,
                        hole: flags & wire::STATE_HOLE != 0,
                    });
                    total += n;
                    if total == req_len {
                        break;
                    }
                }
                Ok(())
            }
            (wire::REPLY_TYPE_ERROR | wire::REPLY_TYPE_ERROR_OFFSET, _) => {
                let payload = small(stream)?;
                let e = wire::decode_error_chunk(kind, &payload).map_err(|e| e.to_string())?;
                if e.code == 0 {
                    return Err("an error chunk with error code 0".into());
                }
                let message = match e.offset {
                    Some(at) => format!("{} (at offset {at})", e.message),
                    None => e.message,
                };
                p.error.get_or_insert((e.code, message));
                Ok(())
            }
            (k, _) if k & (1 << 15) != 0 => {
                // An error type this client does not know: still an error.
                let payload = small(stream)?;
                let code = wire::Fields::new(&payload).u32().unwrap_or(wire::EIO);
                p.error
                    .get_or_insert((code.max(1), format!("error chunk type {k}")));
                Ok(())
            }
            (k, _) => Err(format!(
                "reply chunk type {k} ({len} bytes) does not answer this request"
            )),
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// The part of a request `range` that a chunk of `len` bytes at export
/// offset `at` fills, relative to the request; it must lie inside the
/// request and overlap nothing filled before.
fn place(
    range: &Range<u64>,
    at: u64,
    len: u64,
    covered: &[Range<u64>],
) -> Result<Range<u64>, String> {
    let inside = at >= range.start && at.checked_add(len).is_some_and(|e| e <= range.end);
    if !inside || len == 0 {
        return Err(format!(
            "a reply chunk for bytes {at}..{} of a read of bytes {}..{}",
            at.saturating_add(len),
            range.start,
            range.end
        ));
    }
    let rel = at - range.start..at - range.start + len;
    if covered
        .iter()
        .any(|c| c.start < rel.end && rel.start < c.end)
    {
        return Err(format!(
            "reply chunks overlap at bytes {}..{}",
            at,
            at + len
        ));
    }
    Ok(rel)
}

fn read_exact(stream: &mut UnixStream, buf: &mut [u8]) -> Result<(), String> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
            "no reply from the server within {} s",
            REPLY_TIMEOUT.as_secs()
        ),
        _ => format!("reading from the server failed: {e}"),
    })
}

/// What the handshake settled.
struct Negotiated {
    size: u64,
    flags: u16,
    block: BlockSizes,
    structured: bool,
    allocation: Option<u32>,
}

enum HandshakeError {
    Io(io::Error),
    Wire(WireError),
    Refused(String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl From<WireError> for HandshakeError {
    fn from(e: WireError) -> Self {
        HandshakeError::Wire(e)
    }
}

struct Handshake<'s> {
    stream: &'s UnixStream,
}

impl Handshake<'_> {
    fn run(&mut self, export: &[u8]) -> Result<Negotiated, HandshakeError> {
        let mut greeting = [0u8; 18];
        self.stream.read_exact(&mut greeting[..16])?;
        // Check the magic before waiting for more: an old-style server
        // sends a different amount.
        if let Err(e @ (WireError::Oldstyle | WireError::BadMagic(_))) =
            wire::decode_greeting(&greeting[..16])
        {
            return Err(e.into());
        }
        self.stream.read_exact(&mut greeting[16..])?;
        let flags = wire::decode_greeting(&greeting)?;
        if flags & wire::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::Refused(
                "the server does not speak the fixed newstyle negotiation".into(),
            ));
        }
        let no_zeroes = flags & wire::FLAG_NO_ZEROES != 0;
        self.stream
            .write_all(&wire::encode_client_flags(no_zeroes))?;

        let structured = self.simple_option(wire::OPT_STRUCTURED_REPLY)?;
        let allocation = if structured {
            self.meta_context(export)?
        } else {
            None
        };
        let data = wire::encode_info_request(export, &[wire::INFO_BLOCK_SIZE]);
        self.stream
            .write_all(&wire::encode_option(wire::OPT_GO, &data))?;
        let mut size_flags = None;
        let mut block = None;
        loop {
            let (reply, payload) = self.option_reply(wire::OPT_GO)?;
            match reply {
                wire::REP_ACK => break,
                wire::REP_INFO => match wire::decode_info(&payload)? {
                    Info::Export { size, flags } => size_flags = Some((size, flags)),
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        block = Some(BlockSizes {
                            min,
                            preferred,
                            max,
                        })
                    }
                    Info::Other(_) => {}
                },
                r if r & wire::REP_FLAG_ERROR != 0 => {
                    return Err(HandshakeError::Refused(refusal(r, &payload)))
                }
                r => {
                    return Err(HandshakeError::Refused(format!(
                        "unexpected reply {r:#x} to NBD_OPT_GO"
                    )))
                }
            }
        }
        let Some((size, flags)) = size_flags else {
            return Err(HandshakeError::Refused(
                "the server accepted the export without saying its size".into(),
            ));
        };
        let block = block.unwrap_or(BlockSizes {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        });
        if block.min == 0 || !block.min.is_power_of_two() || block.max < block.min {
            return Err(HandshakeError::Refused(format!(
                "impossible block sizes: minimum {}, maximum {}",
                block.min, block.max
            )));
        }
        Ok(Negotiated {
            size,
            flags,
            block,
            structured,
            allocation,
        })
    }

    /// Send an option without data; true if acknowledged, false if the
    /// server declined it.
    fn simple_option(&mut self, option: u32) -> Result<bool, HandshakeError> {
        self.stream.write_all(&wire::encode_option(option, &[]))?;
        loop {
            let (reply, _) = self.option_reply(option)?;
            match reply {
                wire::REP_ACK => return Ok(true),
                r if r & wire::REP_FLAG_ERROR != 0 => return Ok(false),
                // Informational replies to an option we sent no data for.
                _ => continue,
            }
        }
    }

    /// Ask for `base:allocation`; its context id if the server has it.
    fn meta_context(&mut self, export: &[u8]) -> Result<Option<u32>, HandshakeError> {
        let data = wire::encode_meta_context_request(export, &[wire::BASE_ALLOCATION]);
        self.stream
            .write_all(&wire::encode_option(wire::OPT_SET_META_CONTEXT, &data))?;
        let mut id = None;
        loop {
            let (reply, payload) = self.option_reply(wire::OPT_SET_META_CONTEXT)?;
            match reply {
                wire::REP_ACK => return Ok(id),
                wire::REP_META_CONTEXT => {
                    let (context, name) = wire::decode_meta_context(&payload)?;
                    if name == wire::BASE_ALLOCATION.as_bytes() {
                        id = Some(context);
                    }
                }
                r if r & wire::REP_FLAG_ERROR != 0 => {
                    // An unknown export shows up clearly at NBD_OPT_GO.
                    return Ok(None);
                }
                _ => continue,
            }
        }
    }

    /// Read one reply to `option`: its type and payload.
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
        let mut head = [0u8; wire::OPTION_REPLY_HEADER_LEN];
        self.stream.read_exact(&mut head)?;
        let header = wire::decode_option_reply_header(&head)?;
        if header.option != option {
            return Err(HandshakeError::Refused(format!(
                "the server answered option {} while option {option} was asked",
                header.option
            )));
        }
        if header.len > MAX_OPTION_REPLY {
            return Err(HandshakeError::Refused(format!(
                "an option reply of {} bytes",
                header.len
            )));
        }
        let mut payload = vec![0u8; header.len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok((header.reply, payload))
    }
}

/// Why the server refused `NBD_OPT_GO`, for the user.
fn refusal(reply: u32, payload: &[u8]) -> String {
    let what = match reply {
        wire::REP_ERR_UNKNOWN => "the server has no export of that name",
        wire::REP_ERR_UNSUP => "the server does not support NBD_OPT_GO",
        wire::REP_ERR_INVALID => "the server found the request invalid",
        0x8000_0002 => "the server's policy refuses the export",
        0x8000_0005 => "the server requires TLS",
        0x8000_0008 => "the server requires block size negotiation",
        0x8000_000a => "the server requires extended headers",
        _ => "the server refused the export",
    };
    let message = String::from_utf8_lossy(payload);
    if message.is_empty() {
        format!("{what} (reply {reply:#x})")
    } else {
        format!("{what}: {message}")
    }
}

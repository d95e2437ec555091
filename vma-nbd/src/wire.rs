//! Byte layout of the NBD messages both sides exchange: constants, message
//! types and pure encode/decode functions without I/O.
//!
//! Every message is a run of big-endian fields. [`Fields`] reads them in
//! order from a received buffer (a short buffer is [`WireError::Truncated`],
//! never a panic) and [`Put`] appends them in order; the encoders and
//! decoders below are written only with those two, so each message's
//! layout reads top to bottom as in the protocol document
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).

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
/// Transmission flag: several connections see the same data (so a client
/// may spread its requests over them).
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the session.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list the metadata contexts of an export.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: choose the metadata contexts of `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context the server will report.
pub const REP_META_CONTEXT: u32 = 4;
/// Option reply error: option not supported.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option reply error: option malformed.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option reply error: the server requires TLS first.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// Option reply error: no export of that name.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
/// Bit set in every option reply type that is an error.
pub const REP_FLAG_ERROR: u32 = 0x8000_0000;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
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
/// Command: block status of the negotiated metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes without punching a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: answer a read in one chunk ("don't fragment").
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one block status descriptor is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Error code: operation not permitted.
pub const EPERM: u32 = 1;
/// Error code: input/output error.
pub const EIO: u32 = 5;
/// Error code: out of memory.
pub const ENOMEM: u32 = 12;
/// Error code: invalid argument.
pub const EINVAL: u32 = 22;
/// Error code: no space left.
pub const ENOSPC: u32 = 28;
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
/// Advertised maximum block size, and the longest write or read accepted.
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

/// Bytes of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Bytes of the client flags.
pub const CLIENT_FLAGS_LEN: usize = 4;
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
/// Bytes of an `NBD_INFO_EXPORT` payload.
pub const INFO_EXPORT_LEN: usize = 12;
/// Bytes of an `NBD_INFO_BLOCK_SIZE` payload.
pub const INFO_BLOCK_SIZE_LEN: usize = 14;
/// Zero bytes after the answer to `NBD_OPT_EXPORT_NAME` unless the client
/// asked for none.
pub const EXPORT_NAME_PADDING: usize = 124;

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

/// Reads big-endian fields in order from a received message. Reading past
/// the end is [`WireError::Truncated`], naming the bytes the read needed.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    /// Fields of `buf`, from its start.
    pub fn new(buf: &'a [u8]) -> Fields<'a> {
        Fields { buf, at: 0 }
    }

    /// Fields of `buf`, which must hold at least `len` bytes: a fixed-size
    /// message is checked whole before any field is read.
    pub fn sized(buf: &'a [u8], len: usize) -> Result<Fields<'a>, WireError> {
        if buf.len() < len {
            return Err(WireError::Truncated {
                need: len,
                got: buf.len(),
            });
        }
        Ok(Fields::new(buf))
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::BadOption)?;
        let Some(bytes) = self.buf.get(self.at..end) else {
            return Err(WireError::Truncated {
                need: end,
                got: self.buf.len(),
            });
        };
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    /// The next big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_be_bytes)
    }

    /// The next big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_be_bytes)
    }

    /// The next big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_be_bytes)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let rest = self.buf.get(self.at..).unwrap_or_default();
        self.at = self.buf.len();
        rest
    }
}

/// Appends big-endian fields in order: the one way messages are built.
#[derive(Debug, Clone, Default)]
pub struct Put(Vec<u8>);

impl Put {
    /// An empty message with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Put {
        Put(Vec::with_capacity(capacity))
    }

    /// Append a `u16`.
    pub fn u16(mut self, v: u16) -> Put {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Append a `u32`.
    pub fn u32(mut self, v: u32) -> Put {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Append a `u64`.
    pub fn u64(mut self, v: u64) -> Put {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Append raw bytes.
    pub fn bytes(mut self, b: &[u8]) -> Put {
        self.0.extend_from_slice(b);
        self
    }

    /// Append a length-prefixed (`u32`) string.
    pub fn string32(self, s: &[u8]) -> Put {
        self.u32(len32(s.len())).bytes(s)
    }

    /// The message.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }

    /// The message as an array of its fixed size `N` (the encoders' own
    /// sizes; checked by the unit tests).
    fn fixed<const N: usize>(self) -> [u8; N] {
        debug_assert_eq!(self.0.len(), N);
        let mut out = [0u8; N];
        let n = self.0.len().min(N);
        out[..n].copy_from_slice(&self.0[..n]);
        out
    }
}

/// A length that the protocol carries in 32 bits. Lengths here are bounded
/// well below that (names, payloads of at most [`MAX_PAYLOAD`]).
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
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

/// The data of `NBD_OPT_SET_META_CONTEXT` and `NBD_OPT_LIST_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export name, as sent.
    pub name: &'a [u8],
    /// Context queries, as sent.
    pub queries: Vec<&'a [u8]>,
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

// --- Handshake -----------------------------------------------------------

/// The 18 bytes the server sends first.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    Put::with_capacity(GREETING_LEN)
        .u64(NBDMAGIC)
        .u64(IHAVEOPT)
        .u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .fixed()
}

/// The handshake flags of the server's 18-byte greeting, as a client
/// reads it. The magics are checked first, so 16 bytes tell an old-style
/// server apart.
pub fn decode_greeting(buf: &[u8]) -> Result<u16, WireError> {
    let mut f = Fields::sized(buf, 16)?;
    let magic = f.u64()?;
    if magic != NBDMAGIC {
        return Err(WireError::BadMagic(magic));
    }
    match f.u64()? {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(WireError::Oldstyle),
        other => return Err(WireError::BadMagic(other)),
    }
    Fields::sized(buf, GREETING_LEN)?;
    f.u16()
}

/// The client's 4-byte flags: fixed newstyle, and no zeroes if asked.
pub fn encode_client_flags(no_zeroes: bool) -> [u8; CLIENT_FLAGS_LEN] {
    let mut flags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        flags |= FLAG_C_NO_ZEROES;
    }
    Put::with_capacity(CLIENT_FLAGS_LEN).u32(flags).fixed()
}

/// Decode the client's 4-byte flags; unknown flags are an error.
pub fn decode_client_flags(buf: &[u8]) -> Result<ClientFlags, WireError> {
    let flags = Fields::sized(buf, CLIENT_FLAGS_LEN)?.u32()?;
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(WireError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option as the client sends it: header and data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    Put::with_capacity(OPTION_HEADER_LEN + data.len())
        .u64(IHAVEOPT)
        .u32(option)
        .string32(data)
        .finish()
}

/// Decode a 16-byte option header.
pub fn decode_option_header(buf: &[u8]) -> Result<OptionHeader, WireError> {
    let mut f = Fields::sized(buf, OPTION_HEADER_LEN)?;
    let magic = f.u64()?;
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: f.u32()?,
        len: f.u32()?,
    })
}

/// The data of `NBD_OPT_INFO` or `NBD_OPT_GO`: the export name and the
/// information types asked for.
pub fn encode_info_request(name: &[u8], info: &[u16]) -> Vec<u8> {
    let count = u16::try_from(info.len()).unwrap_or(u16::MAX);
    let mut put = Put::with_capacity(6 + name.len() + 2 * info.len())
        .string32(name)
        .u16(count);
    for &i in info.iter().take(usize::from(count)) {
        put = put.u16(i);
    }
    put.finish()
}

/// Decode the data of `NBD_OPT_INFO` or `NBD_OPT_GO`: name length, name,
/// count of information requests, the requests. Must be exactly that long.
pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest<'_>, WireError> {
    let mut f = Fields::new(data);
    let name_len = f.u32()? as usize;
    let name = f.bytes(name_len)?;
    let count = f.u16()?;
    let body = f.rest();
    if body.len() != usize::from(count) * 2 {
        return Err(WireError::BadOption);
    }
    let mut items = Fields::new(body);
    let info = (0..count).map(|_| items.u16()).collect::<Result<_, _>>()?;
    Ok(InfoRequest { name, info })
}

/// The data of `NBD_OPT_SET_META_CONTEXT` or `NBD_OPT_LIST_META_CONTEXT`:
/// the export name and the context queries.
pub fn encode_meta_context_request(name: &[u8], queries: &[&str]) -> Vec<u8> {
    let mut put = Put::default().string32(name).u32(len32(queries.len()));
    for q in queries {
        put = put.string32(q.as_bytes());
    }
    put.finish()
}

/// Decode the data of `NBD_OPT_SET_META_CONTEXT` or
/// `NBD_OPT_LIST_META_CONTEXT`. Must be exactly as long as it says.
pub fn decode_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, WireError> {
    let mut f = Fields::new(data);
    let name_len = f.u32()? as usize;
    let name = f.bytes(name_len)?;
    let count = f.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = f.u32()? as usize;
        queries.push(f.bytes(len)?);
    }
    if !f.rest().is_empty() {
        return Err(WireError::BadOption);
    }
    Ok(MetaContextRequest { name, queries })
}

/// An option reply: header and `payload`.
pub fn encode_option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    Put::with_capacity(OPTION_REPLY_HEADER_LEN + payload.len())
        .u64(OPTION_REPLY_MAGIC)
        .u32(option)
        .u32(reply)
        .string32(payload)
        .finish()
}

/// Decode a 20-byte option reply header.
pub fn decode_option_reply_header(buf: &[u8]) -> Result<OptionReply, WireError> {
    let mut f = Fields::sized(buf, OPTION_REPLY_HEADER_LEN)?;
    let magic = f.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    Ok(OptionReply {
        option: f.u32()?,
        reply: f.u32()?,
        len: f.u32()?,
    })
}

/// Payload of `NBD_REP_SERVER`: one export name.
pub fn encode_server_reply(name: &[u8]) -> Vec<u8> {
    Put::with_capacity(4 + name.len()).string32(name).finish()
}

/// Payload of `NBD_REP_INFO` with `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> [u8; INFO_EXPORT_LEN] {
    Put::with_capacity(INFO_EXPORT_LEN)
        .u16(INFO_EXPORT)
        .u64(size)
        .u16(flags)
        .fixed()
}

/// Payload of `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; INFO_BLOCK_SIZE_LEN] {
    Put::with_capacity(INFO_BLOCK_SIZE_LEN)
        .u16(INFO_BLOCK_SIZE)
        .u32(min)
        .u32(preferred)
        .u32(max)
        .fixed()
}

/// Decode an `NBD_REP_INFO` payload.
pub fn decode_info(payload: &[u8]) -> Result<Info, WireError> {
    let mut f = Fields::new(payload);
    let bad = |what: &str| WireError::BadReply(what.to_owned());
    match f.u16()? {
        INFO_EXPORT if payload.len() == INFO_EXPORT_LEN => Ok(Info::Export {
            size: f.u64()?,
            flags: f.u16()?,
        }),
        INFO_EXPORT => Err(bad("NBD_INFO_EXPORT is not 12 bytes")),
        INFO_BLOCK_SIZE if payload.len() == INFO_BLOCK_SIZE_LEN => Ok(Info::BlockSize {
            min: f.u32()?,
            preferred: f.u32()?,
            max: f.u32()?,
        }),
        INFO_BLOCK_SIZE => Err(bad("NBD_INFO_BLOCK_SIZE is not 14 bytes")),
        other => Ok(Info::Other(other)),
    }
}

/// Payload of `NBD_REP_META_CONTEXT`: context id and name.
pub fn encode_meta_context(id: u32, name: &[u8]) -> Vec<u8> {
    Put::with_capacity(4 + name.len())
        .u32(id)
        .bytes(name)
        .finish()
}

/// Decode an `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn decode_meta_context(payload: &[u8]) -> Result<(u32, &[u8]), WireError> {
    let mut f = Fields::new(payload);
    Ok((f.u32()?, f.rest()))
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, flags and, unless the
/// client asked for no zeroes, 124 zero bytes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let padding = if no_zeroes { 0 } else { EXPORT_NAME_PADDING };
    Put::with_capacity(10 + padding)
        .u64(size)
        .u16(flags)
        .bytes(&[0; EXPORT_NAME_PADDING][..padding])
        .finish()
}

// --- Transmission --------------------------------------------------------

/// Encode a request header (what a client sends).
pub fn encode_request(request: &Request) -> [u8; REQUEST_LEN] {
    Put::with_capacity(REQUEST_LEN)
        .u32(REQUEST_MAGIC)
        .u16(request.flags)
        .u16(request.kind)
        .u64(request.cookie)
        .u64(request.offset)
        .u32(request.len)
        .fixed()
}

/// Decode a 28-byte request header.
pub fn decode_request(buf: &[u8]) -> Result<Request, WireError> {
    let mut f = Fields::sized(buf, REQUEST_LEN)?;
    let magic = f.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic(u64::from(magic)));
    }
    Ok(Request {
        flags: f.u16()?,
        kind: f.u16()?,
        cookie: f.u64()?,
        offset: f.u64()?,
        len: f.u32()?,
    })
}

/// A simple reply: magic, error code (0: success), cookie.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    Put::with_capacity(SIMPLE_REPLY_LEN)
        .u32(SIMPLE_REPLY_MAGIC)
        .u32(error)
        .u64(cookie)
        .fixed()
}

/// The header of a structured reply chunk with `len` payload bytes.
pub fn encode_chunk_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    len: u32,
) -> [u8; STRUCTURED_REPLY_LEN] {
    Put::with_capacity(STRUCTURED_REPLY_LEN)
        .u32(STRUCTURED_REPLY_MAGIC)
        .u16(flags)
        .u16(kind)
        .u64(cookie)
        .u32(len)
        .fixed()
}

/// A whole structured reply chunk: header and payload.
pub fn encode_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let header = encode_chunk_header(flags, kind, cookie, len32(payload.len()));
    Put::with_capacity(STRUCTURED_REPLY_LEN + payload.len())
        .bytes(&header)
        .bytes(payload)
        .finish()
}

/// Bytes of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk before its data.
pub const OFFSET_DATA_HEADER_LEN: usize = STRUCTURED_REPLY_LEN + 8;

/// The start of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `data_len`
/// bytes read at `offset`: chunk header and offset (the data follows).
pub fn encode_offset_data_header(
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: usize,
) -> [u8; OFFSET_DATA_HEADER_LEN] {
    let len = len32(8 + data_len);
    let header = encode_chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, len);
    Put::with_capacity(OFFSET_DATA_HEADER_LEN)
        .bytes(&header)
        .u64(offset)
        .fixed()
}

/// Length of the reply header that starts with `magic` (the first four
/// bytes), magic included.
pub fn reply_header_len(magic: &[u8]) -> Result<usize, WireError> {
    match Fields::new(magic).u32()? {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
        other => Err(WireError::BadMagic(u64::from(other))),
    }
}

/// Decode a reply header (16 bytes simple, 20 bytes structured).
pub fn decode_reply_header(buf: &[u8]) -> Result<ReplyHeader, WireError> {
    let len = reply_header_len(buf)?;
    let mut f = Fields::sized(buf, len)?;
    f.u32()?;
    Ok(if len == SIMPLE_REPLY_LEN {
        ReplyHeader::Simple {
            error: f.u32()?,
            cookie: f.u64()?,
        }
    } else {
        ReplyHeader::Structured {
            flags: f.u16()?,
            kind: f.u16()?,
            cookie: f.u64()?,
            len: f.u32()?,
        }
    })
}

/// Payload of `NBD_REPLY_TYPE_OFFSET_HOLE`: offset, length.
pub fn encode_offset_hole(offset: u64, len: u32) -> Vec<u8> {
    Put::with_capacity(12).u64(offset).u32(len).finish()
}

/// Decode the payload of `NBD_REPLY_TYPE_OFFSET_HOLE`: offset, length.
pub fn decode_offset_hole(payload: &[u8]) -> Result<(u64, u32), WireError> {
    if payload.len() != 12 {
        return Err(WireError::BadReply(format!(
            "an NBD_REPLY_TYPE_OFFSET_HOLE chunk of {} bytes (12 expected)",
            payload.len()
        )));
    }
    let mut f = Fields::new(payload);
    Ok((f.u64()?, f.u32()?))
}

/// Payload of an error chunk: code, message and, for
/// `NBD_REPLY_TYPE_ERROR_OFFSET`, the offset.
pub fn encode_error_chunk(code: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(usize::from(u16::MAX))];
    let put = Put::with_capacity(14 + message.len())
        .u32(code)
        .u16(message.len() as u16)
        .bytes(message);
    match offset {
        Some(at) => put.u64(at).finish(),
        None => put.finish(),
    }
}

/// Decode the payload of an error chunk of type `kind`.
pub fn decode_error_chunk(kind: u16, payload: &[u8]) -> Result<ChunkError, WireError> {
    let mut f = Fields::sized(payload, 6)?;
    let code = f.u32()?;
    let message_len = usize::from(f.u16()?);
    let message = String::from_utf8_lossy(f.bytes(message_len)?).into_owned();
    let rest = f.rest();
    let offset = match (kind, rest.len()) {
        (REPLY_TYPE_ERROR_OFFSET, 8) => Some(Fields::new(rest).u64()?),
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

/// Payload of `NBD_REPLY_TYPE_BLOCK_STATUS`: the context id and the
/// (length, flags) descriptors.
pub fn encode_block_status(context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut put = Put::with_capacity(4 + 8 * descriptors.len()).u32(context);
    for &(len, flags) in descriptors {
        put = put.u32(len).u32(flags);
    }
    put.finish()
}

/// Decode the payload of `NBD_REPLY_TYPE_BLOCK_STATUS`: the context id
/// and the (length, flags) descriptors.
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), WireError> {
    let mut f = Fields::new(payload);
    let context = f.u32()?;
    let body = f.rest();
    if body.is_empty() || !body.len().is_multiple_of(8) {
        return Err(WireError::BadReply(format!(
            "an NBD_REPLY_TYPE_BLOCK_STATUS chunk of {} bytes",
            payload.len()
        )));
    }
    let mut d = Fields::new(body);
    let descriptors = (0..body.len() / 8)
        .map(|_| Ok((d.u32()?, d.u32()?)))
        .collect::<Result<_, WireError>>()?;
    Ok((context, descriptors))
}

// --- Errors --------------------------------------------------------------

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

/// The NBD error code for an export's error: `ENOSPC` for a full device or
/// quota (`ENOSPC`, `EDQUOT`, `EFBIG`), `EPERM` for a refused operation,
/// `EIO` for anything else.
pub fn error_code(error: &io::Error) -> u32 {
    match error.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
        Some(libc::EPERM | libc::EROFS) => EPERM,
        _ => EIO,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request with cookie 7 and no flags.
    pub(crate) fn request(kind: u16, offset: u64, len: u32) -> Request {
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

    /// The data of `NBD_OPT_INFO`/`GO`, built by hand.
    pub(crate) fn info_data(name: &[u8], info: &[u16]) -> Vec<u8> {
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
}

//! The NBD server against QEMU's own NBD client (`qemu-io`, `qemu-img`)
//! and against a hand-written client for what QEMU never sends.

mod support;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use support::{require, K64};
use vma_nbd::{wire, Export, ExportFlags, NbdExport, NbdServer, StatusExtent};

/// What reached a [`MemSink`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    Write(u64, usize),
    Zeroes(u64, u64),
    Trim(u64, u64),
    Flush,
}

/// Keeps an export's bytes in memory and logs every call. Fails every call
/// with the OS error in `fail` while it is not 0.
struct MemSink {
    data: Mutex<Vec<u8>>,
    log: Mutex<Vec<Rec>>,
    fail: AtomicI32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap()
}

impl MemSink {
    fn new(size: u64) -> Arc<MemSink> {
        Arc::new(MemSink {
            // Non-zero, so that zero writes show.
            data: Mutex::new(vec![0x5a; size as usize]),
            log: Mutex::new(Vec::new()),
            fail: AtomicI32::new(0),
        })
    }

    fn check(&self) -> io::Result<()> {
        match self.fail.load(Ordering::SeqCst) {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    fn data(&self) -> Vec<u8> {
        lock(&self.data).clone()
    }

    fn log(&self) -> Vec<Rec> {
        lock(&self.log).clone()
    }
}

impl NbdExport for MemSink {
    fn size(&self) -> u64 {
        lock(&self.data).len() as u64
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags::WRITE_ONLY
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        lock(&self.log).push(Rec::Write(offset, data.len()));
        let o = offset as usize;
        lock(&self.data)[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        lock(&self.log).push(Rec::Zeroes(offset, len));
        lock(&self.data)[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        lock(&self.log).push(Rec::Trim(offset, len));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.check()?;
        lock(&self.log).push(Rec::Flush);
        Ok(())
    }
}

/// A server in a temporary directory with one export per (name, size).
struct Fixture {
    dir: tempfile::TempDir,
    server: NbdServer,
    sinks: Vec<Arc<MemSink>>,
}

impl Fixture {
    fn new(exports: &[(&str, u64)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sinks: Vec<Arc<MemSink>> = exports.iter().map(|e| MemSink::new(e.1)).collect();
        let exports = exports
            .iter()
            .zip(&sinks)
            .map(|((name, _), sink)| Export::new(*name, sink.clone() as Arc<dyn NbdExport>))
            .collect();
        let server = NbdServer::bind_unix(&dir.path().join("nbd.sock"), exports).unwrap();
        Fixture { dir, server, sinks }
    }

    fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.server.socket_path().display()
        )
    }

    /// Run `qemu-io` on `export` with `cmds`.
    fn qemu_io(&self, export: &str, cmds: &[&str]) -> Output {
        require("qemu-io");
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", "-d", "unmap"]).arg(self.uri(export));
        for c in cmds {
            cmd.args(["-c", c]);
        }
        cmd.output().unwrap()
    }

    /// Copy `source` into the first export, `export`, with `qemu-img
    /// convert` (and `args`); the export then holds exactly `source`.
    fn qemu_img_convert(&self, export: &str, source: &[u8], args: &[&str]) {
        let src = self.dir.path().join(format!("{export}.src.raw"));
        std::fs::write(&src, source).unwrap();
        let out = Command::new("qemu-img")
            .args(["convert", "-n"])
            .args(args)
            .args(["-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(self.uri(export))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            self.sinks[0].data() == source,
            "sink bytes differ from the source"
        );
    }

    /// Wait until every client connection has ended.
    fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.server.connection_count() > 0 {
            assert!(Instant::now() < deadline, "connections did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(out: &Output) {
    let all = text(out);
    assert!(
        out.status.success() && !all.contains("failed") && !all.contains("error"),
        "{all}"
    );
}

fn assert_failed(out: &Output, what: &str) {
    let all = text(out);
    assert!(
        !out.status.success() && all.contains(what),
        "expected a failure with {what:?}: {all}"
    );
}

#[test]
fn qemu_io_writes_reach_the_sink_exactly() {
    let size = 3 * K64 + 512;
    let f = Fixture::new(&[("drive-scsi0", size)]);
    let out = f.qemu_io(
        "drive-scsi0",
        &[
            "length",
            "write -P 0xab 0 64k",
            "write -P 0xcd 1536 4k",
            "write -P 0x11 196608 512",
            "write -P 0x22 65536 64k",
            "write -z 69632 8k",
            "write -P 0x33 131075 1000",
            "discard 131072 64k",
            "flush",
        ],
    );
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("192.500 KiB"),
        "length: {}",
        text(&out)
    );
    let mut expect = vec![0x5a; size as usize];
    let mut put = |at: usize, len: usize, byte: u8| expect[at..at + len].fill(byte);
    put(0, 65536, 0xab);
    put(1536, 4096, 0xcd);
    put(196608, 512, 0x11);
    put(65536, 65536, 0x22);
    put(69632, 8192, 0);
    put(131075, 1000, 0x33);
    assert!(f.sinks[0].data() == expect, "sink bytes differ");
    let log = f.sinks[0].log();
    for rec in [
        Rec::Write(1536, 4096),
        Rec::Write(196608, 512),
        Rec::Write(131075, 1000),
        Rec::Zeroes(69632, 8192),
        Rec::Trim(131072, 65536),
        Rec::Flush,
    ] {
        assert!(log.contains(&rec), "{rec:?} not in {log:?}");
    }
    f.wait_idle();
}

#[test]
fn qemu_img_reports_the_exact_size() {
    require("qemu-img");
    let size = 5 * K64 + 512;
    let f = Fixture::new(&[("", 1024), ("disk", size)]);
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(f.uri("disk"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], size, "{info}");
    // The empty name is the default export.
    let out = f.qemu_io("", &["length"]);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 KiB"),
        "{}",
        text(&out)
    );
}

#[test]
fn out_of_range_writes_fail() {
    let size = 3 * K64 + 512;
    let f = Fixture::new(&[("d", size)]);
    let out = f.qemu_io("d", &["write -P 1 196608 1024"]);
    assert_failed(&out, "write failed");
    let out = f.qemu_io("d", &["write -P 1 197120 512"]);
    assert_failed(&out, "write failed");
    let log = f.sinks[0].log();
    assert!(log.iter().all(|r| *r == Rec::Flush), "{log:?}");
}

#[test]
fn unknown_export_fails_cleanly() {
    let f = Fixture::new(&[("known", K64)]);
    let out = f.qemu_io("unknown", &["write 0 512"]);
    assert_failed(&out, "unknown");
    f.wait_idle();
    assert_ok(&f.qemu_io("known", &["write -P 7 0 512"]));
    assert_eq!(f.sinks[0].log()[0], Rec::Write(0, 512));
}

#[test]
fn qemu_io_many_writes_in_flight() {
    let size = 64 * K64;
    let f = Fixture::new(&[("d", size)]);
    let mut cmds: Vec<String> = (0..48u64)
        .map(|i| format!("aio_write -P {} {} 65536", i + 1, (47 - i) * K64))
        .collect();
    cmds.push("aio_flush".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    assert_ok(&f.qemu_io("d", &cmds));
    let data = f.sinks[0].data();
    for i in 0..48u64 {
        let at = ((47 - i) * K64) as usize;
        assert!(data[at..at + K64 as usize]
            .iter()
            .all(|&b| b == (i + 1) as u8));
    }
    assert!(data[48 * K64 as usize..].iter().all(|&b| b == 0x5a));
}

#[test]
fn qemu_img_convert_with_parallel_out_of_order_writes() {
    require("qemu-img");
    let size: u64 = 16 << 20;
    let f = Fixture::new(&[("drive", size)]);
    // Patterned, with zero runs of several sizes.
    let mut source = vec![0u8; size as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, chunk) in source.chunks_mut(4096).enumerate() {
        if i % 7 == 3 || (300..700).contains(&i) {
            continue;
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    f.qemu_img_convert("drive", &source, &["-W", "-m", "16"]);
    let log = f.sinks[0].log();
    assert!(log.iter().any(|r| matches!(r, Rec::Zeroes(..))), "{log:?}");
}

/// QEMU sees a 1000-byte export as 1024 bytes and writes that rounded tail:
/// zeroes past the end are dropped, anything else there is refused.
#[test]
fn export_size_not_a_multiple_of_512() {
    require("qemu-img");
    let f = Fixture::new(&[("odd", 1000)]);
    let source: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8 + 1).collect();
    f.qemu_img_convert("odd", &source, &[]);
    assert_ok(&f.qemu_io("odd", &["write -P 3 990 10", "write -z 1000 24"]));
    assert!(f.sinks[0].data()[990..].iter().all(|&b| b == 3));
    assert_failed(
        &f.qemu_io("odd", &["write -P 3 1000 24"]),
        "Invalid argument",
    );
}

#[test]
fn failing_sink_fails_the_request_and_keeps_serving() {
    let f = Fixture::new(&[("d", K64)]);
    f.sinks[0].fail.store(libc::EIO, Ordering::SeqCst);
    let out = f.qemu_io("d", &["write -P 1 0 4k"]);
    assert_failed(&out, "Input/output error");
    f.sinks[0].fail.store(libc::ENOSPC, Ordering::SeqCst);
    let out = f.qemu_io("d", &["write -P 1 0 4k"]);
    assert_failed(&out, "No space left on device");
    f.sinks[0].fail.store(0, Ordering::SeqCst);
    assert_ok(&f.qemu_io("d", &["write -P 2 512 4k", "flush"]));
    assert!(f.sinks[0].data()[512..4608].iter().all(|&b| b == 2));
}

/// A minimal NBD client speaking raw bytes.
struct Client {
    s: UnixStream,
}

impl Client {
    /// Connect and go to `export`; panics unless the server accepts it.
    fn go(path: &Path, export: &str) -> Client {
        let mut c = Client::handshake(path);
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
        c.option(wire::OPT_GO, &data);
        loop {
            let (reply, payload) = c.option_reply(wire::OPT_GO);
            match reply {
                wire::REP_INFO => assert!(payload.len() == 12 || payload.len() == 14),
                wire::REP_ACK => return c,
                other => panic!("GO answered with {other:#x}"),
            }
        }
    }

    fn handshake(path: &Path) -> Client {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Client { s }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut o = wire::IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&option.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        self.s.write_all(&o).unwrap();
    }

    fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(&head[..8], &wire::OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes(head[8..12].try_into().unwrap()), option);
        let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).unwrap();
        (reply, payload)
    }

    fn send(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let r = wire::Request {
            flags: 0,
            kind,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&wire::encode_request(&r)).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// (error, cookie) of the next simple reply.
    fn reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).unwrap();
        assert_eq!(&r[..4], &wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    /// Whether the server closes the connection (within the read timeout).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

#[test]
fn raw_client_pipelines_requests_and_errors_stay_in_sync() {
    let size = 1 << 20;
    let f = Fixture::new(&[("d", size)]);
    let mut c = Client::go(f.server.socket_path(), "d");
    // 40 writes before reading any reply, plus requests that fail.
    for i in 0..40u64 {
        c.send(
            wire::CMD_WRITE,
            1000 + i,
            i * 4096 + 3,
            4096,
            &[i as u8; 4096],
        );
    }
    c.send(wire::CMD_WRITE, 1, size - 100, 200, &[9; 200]); // past the end
    c.send(wire::CMD_READ, 2, 0, 4096, &[]);
    c.send(wire::CMD_WRITE, 3, size - 1, 1, &[7]);
    c.send(9, 4, 0, 0, &[]);
    c.send(wire::CMD_FLUSH, 5, 0, 0, &[]);
    let mut replies: Vec<(u32, u64)> = (0..45).map(|_| c.reply()).collect();
    replies.sort_by_key(|r| r.1);
    let mut expect: Vec<(u32, u64)> = (0..40).map(|i| (0, 1000 + i)).collect();
    expect.extend([
        (wire::EINVAL, 1),
        (wire::EIO, 2),
        (0, 3),
        (wire::EINVAL, 4),
        (0, 5),
    ]);
    expect.sort_by_key(|r| r.1);
    assert_eq!(replies, expect);
    c.send(wire::CMD_DISC, 6, 0, 0, &[]);
    assert!(c.closed());
    let data = f.sinks[0].data();
    for i in 0..40usize {
        let at = i * 4096 + 3;
        assert!(data[at..at + 4096].iter().all(|&b| b == i as u8));
    }
    assert_eq!(data[size as usize - 1], 7);
    assert_eq!(data[size as usize - 100], 0x5a);
    f.wait_idle();
}

#[test]
fn raw_client_protocol_violations_close_only_that_connection() {
    let f = Fixture::new(&[("d", K64)]);
    let path = f.server.socket_path();

    let mut c = Client::go(path, "d");
    c.s.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed(), "bad magic");

    let mut c = Client::go(path, "d");
    c.send(wire::CMD_WRITE, 1, 0, wire::MAX_PAYLOAD + 1, &[]);
    assert!(c.closed(), "oversized write");

    let mut c = Client::handshake(path);
    c.option(wire::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        c.option_reply(wire::OPT_STRUCTURED_REPLY).0,
        wire::REP_ERR_UNSUP
    );
    c.option(10, b"\0\0\0\x01d\0\0\0\0"); // NBD_OPT_SET_META_CONTEXT
    assert_eq!(c.option_reply(10).0, wire::REP_ERR_UNSUP);
    c.option(11, &[]); // NBD_OPT_EXTENDED_HEADERS
    assert_eq!(c.option_reply(11).0, wire::REP_ERR_UNSUP);
    c.option(wire::OPT_ABORT, &[]);
    assert_eq!(c.option_reply(wire::OPT_ABORT).0, wire::REP_ACK);
    assert!(c.closed());

    // Garbage instead of client flags, and a client that vanishes mid-write.
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    let mut c = Client::go(path, "d");
    c.send(wire::CMD_WRITE, 1, 0, 4096, &[1; 100]);
    drop(c);
    drop(s);
    f.wait_idle();

    let mut c = Client::go(path, "d");
    c.send(wire::CMD_WRITE, 9, 0, 4, b"good");
    assert_eq!(c.reply(), (0, 9));
    assert_eq!(f.sinks[0].log(), vec![Rec::Write(0, 4)]);
}

#[test]
fn shutdown_closes_connections_and_removes_the_socket() {
    let f = Fixture::new(&[("d", K64)]);
    let path = f.server.socket_path().to_path_buf();
    let mut idle = Client::go(&path, "d");
    let mut handshaking = Client::handshake(&path);
    let started = Instant::now();
    f.server.shutdown();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(idle.closed());
    assert!(handshaking.closed());
    assert!(!path.exists());
}

/// A read-only view of bytes held in memory. `base:allocation` reports
/// every 4 KiB block that is all zero as a hole reading as zeros, as a
/// view of an archive would from its index.
struct MemView {
    data: Vec<u8>,
}

const BLOCK: u64 = 4096;

impl MemView {
    fn zero_block(&self, at: u64) -> bool {
        let end = (at + BLOCK).min(self.data.len() as u64);
        self.data[at as usize..end as usize].iter().all(|&b| b == 0)
    }
}

impl NbdExport for MemView {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags::READ_ONLY
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = offset as usize;
        buf.copy_from_slice(&self.data[at..at + buf.len()]);
        Ok(())
    }

    fn meta_contexts(&self) -> Vec<String> {
        vec![wire::BASE_ALLOCATION.into()]
    }

    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        assert_eq!(context, wire::BASE_ALLOCATION);
        let size = self.size();
        let end = (offset + len).min(size);
        let mut extents: Vec<StatusExtent> = Vec::new();
        let mut at = offset;
        while at < end {
            let block_end = ((at / BLOCK + 1) * BLOCK).min(size);
            let flags = if self.zero_block(at / BLOCK * BLOCK) {
                wire::STATE_HOLE | wire::STATE_ZERO
            } else {
                0
            };
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.len += block_end - at,
                _ => extents.push(StatusExtent {
                    len: block_end - at,
                    flags,
                }),
            }
            at = block_end;
        }
        Ok(extents)
    }
}

/// 4 MiB and 1000 bytes: noise, with zero stretches of several lengths.
fn view_bytes() -> Vec<u8> {
    let size = (4 << 20) + 1000;
    let mut data = support::noise(11, size);
    for (start, len) in [(0usize, 8192usize), (65536, 300_000), (2 << 20, 4096)] {
        data[start..start + len].fill(0);
    }
    data
}

/// A server with the view `view` of [`view_bytes`].
fn view_server(dir: &Path) -> (NbdServer, Vec<u8>) {
    let data = view_bytes();
    let view = Arc::new(MemView { data: data.clone() });
    let server =
        NbdServer::bind_unix(&dir.join("view.sock"), vec![Export::new("view", view)]).unwrap();
    (server, data)
}

fn uri(server: &NbdServer, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        server.socket_path().display()
    )
}

#[test]
fn qemu_img_reads_a_view_and_cannot_write_it() {
    require("qemu-img");
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (server, data) = view_server(dir.path());
    let copy = dir.path().join("copy.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri(&server, "view"))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let copied = std::fs::read(&copy).unwrap();
    // QEMU rounds the size up to whole sectors.
    assert_eq!(copied.len(), data.len().next_multiple_of(512));
    assert!(copied[..data.len()] == data, "the copy differs");
    assert!(copied[data.len()..].iter().all(|&b| b == 0));
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(uri(&server, "view"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let zero_bytes: u64 = map
        .iter()
        // Past the end: the sector tail QEMU adds.
        .filter(|m| m["zero"] == true && m["start"].as_u64().unwrap() < data.len() as u64)
        .map(|m| m["length"].as_u64().unwrap())
        .sum();
    assert_eq!(zero_bytes, 8192 + 300_000 / 4096 * 4096 + 4096, "{map:?}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(uri(&server, "view"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
}

/// What `nbdinfo ARGS URI` prints, as JSON.
fn nbdinfo(args: &[&str], uri: &str) -> serde_json::Value {
    let out = Command::new("nbdinfo")
        .args(args)
        .arg(uri)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The first export of `nbdinfo --json` output has the block sizes
/// `BlockSize::BYTES` announces: any alignment, 64 KiB preferred, 32 MiB
/// at most.
fn assert_default_block_sizes(info: &serde_json::Value) {
    let export = &info["exports"][0];
    assert_eq!(export["block_size_minimum"], 1, "{info}");
    assert_eq!(export["block_size_preferred"], 65536, "{info}");
    assert_eq!(export["block_size_maximum"], 32 << 20, "{info}");
}

#[test]
fn nbdinfo_sees_a_read_only_view_with_block_sizes_and_allocation() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (server, data) = view_server(dir.path());
    let info = nbdinfo(&["--json"], &uri(&server, "view"));
    assert_eq!(info["structured"], true, "{info}");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], data.len() as u64, "{info}");
    assert_eq!(export["is_read_only"], true, "{info}");
    assert_eq!(export["can_multi_conn"], true, "{info}");
    assert_eq!(export["can_df"], true, "{info}");
    assert_default_block_sizes(&info);
    assert_eq!(export["contexts"], serde_json::json!(["base:allocation"]));

    let map = nbdinfo(&["--map", "--json"], &uri(&server, "view"));
    let map = map.as_array().unwrap();
    let mut at = 0;
    for m in map {
        let (offset, len) = (m["offset"].as_u64().unwrap(), m["length"].as_u64().unwrap());
        assert_eq!(offset, at, "{map:?}");
        let zero = m["type"].as_u64().unwrap() & u64::from(wire::STATE_ZERO) != 0;
        let piece = &data[offset as usize..(offset + len) as usize];
        assert_eq!(zero, piece.iter().all(|&b| b == 0), "at {offset}: {map:?}");
        at += len;
    }
    assert_eq!(at, data.len() as u64);
}

#[test]
fn several_clients_read_a_view_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, data) = view_server(dir.path());
    let path = server.socket_path().to_path_buf();
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let client = vma_nbd::NbdClient::connect_unix(&path, "view").unwrap();
                    assert!(client.read_only() && client.structured_replies());
                    assert!(client.has_block_status());
                    let mut got = vec![0xa5; data.len()];
                    client.read_at(0, &mut got).unwrap();
                    let zeros = client.block_status(0, client.size()).unwrap();
                    (client, got, zeros)
                })
            })
            .collect();
        let clients: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        assert_eq!(server.connection_count(), 4);
        for (client, got, extents) in clients {
            assert!(got == data, "a read differs");
            let mut at = 0usize;
            for e in extents {
                let piece = &data[at..at + e.len as usize];
                assert_eq!(e.zero, piece.iter().all(|&b| b == 0), "at {at}");
                at += e.len as usize;
            }
            client.disconnect();
        }
    });
}

#[test]
fn writes_to_a_view_are_refused_and_the_stream_stays_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = view_server(dir.path());
    let mut c = Client::go(server.socket_path(), "view");
    c.send(wire::CMD_WRITE, 1, 0, 4, b"data");
    c.send(wire::CMD_WRITE_ZEROES, 2, 0, 4096, &[]);
    c.send(wire::CMD_TRIM, 3, 0, 4096, &[]);
    c.send(wire::CMD_FLUSH, 4, 0, 0, &[]);
    let replies: Vec<(u32, u64)> = (0..4).map(|_| c.reply()).collect();
    assert_eq!(
        replies,
        vec![(wire::EPERM, 1), (wire::EPERM, 2), (wire::EPERM, 3), (0, 4)]
    );
    // Without structured replies, a read is a simple reply and its data.
    c.send(wire::CMD_READ, 5, 8192, 16, &[]);
    assert_eq!(c.reply(), (0, 5));
    let mut got = [0u8; 16];
    c.s.read_exact(&mut got).unwrap();
    assert_eq!(got[..], view_bytes()[8192..8208]);
}

/// A capture target announces its block sizes (`NBD_INFO_BLOCK_SIZE`):
/// any alignment, 64 KiB preferred, 32 MiB at most.
#[test]
fn nbdinfo_sees_the_block_sizes_of_a_target() {
    require("nbdinfo");
    let f = Fixture::new(&[("target", 3 * K64 + 512)]);
    let info = nbdinfo(&["--no-content", "--json"], &f.uri("target"));
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 3 * K64 + 512, "{info}");
    assert_eq!(export["is_read_only"], false, "{info}");
    assert_eq!(export["can_zero"], true, "{info}");
    assert_eq!(export["can_trim"], true, "{info}");
    assert_default_block_sizes(&info);
}

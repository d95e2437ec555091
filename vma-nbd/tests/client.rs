//! The NBD client against QEMU's NBD server (`qemu-nbd`), against this
//! crate's server with a write-only export (simple replies only) and
//! against a scripted server that breaks the protocol.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use support::{noise, served_mixed_qcow2, QemuNbd, K64};
use vma_nbd::client::Error;
use vma_nbd::{wire, Export, ExportFlags, NbdClient, NbdExport, NbdServer};

#[test]
fn reads_a_qcow2_export_with_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (server, want) = served_mixed_qcow2(dir.path());
    let client = server.connect("disk");
    assert_eq!(client.size(), want.len() as u64);
    assert!(client.structured_replies());
    assert!(client.has_block_status());
    assert!(client.read_only());
    // The whole export in one call: 17 requests of 512 KiB and a tail.
    let mut got = vec![0xa5u8; want.len()];
    client.read_at(0, &mut got).unwrap();
    assert!(got == want, "whole-export read differs");
    // Odd pieces anywhere, the end included.
    for (at, len) in [
        (1u64, 1usize),
        (4095, 2),
        (3 * K64 + 4000, 5200),
        (want.len() as u64 - 700, 700),
    ] {
        let mut buf = vec![0xa5u8; len];
        client.read_at(at, &mut buf).unwrap();
        assert!(buf == want[at as usize..at as usize + len], "read at {at}");
    }
    client.read_at(want.len() as u64, &mut []).unwrap();
}

#[test]
fn block_status_reports_only_zero_stretches_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (server, want) = served_mixed_qcow2(dir.path());
    let client = server.connect("disk");
    let size = client.size();
    let extents = client.block_status(0, size).unwrap();
    let total: u64 = extents.iter().map(|e| e.len).sum();
    assert_eq!(total, size, "{extents:?}");
    let mut at = 0u64;
    let mut zero_bytes = 0;
    for e in &extents {
        let piece = &want[at as usize..(at + e.len) as usize];
        if e.zero {
            assert!(piece.iter().all(|&b| b == 0), "extent at {at} is not zero");
            zero_bytes += e.len;
        }
        at += e.len;
    }
    // Most of the image is unallocated or zero clusters.
    assert!(zero_bytes >= size - 24 * K64, "{extents:?}");
    // A query in the middle starts at its offset and stays inside it.
    let extents = client.block_status(40 * K64 + 100, 5 * K64).unwrap();
    assert!(!extents[0].zero);
    assert!(extents.iter().map(|e| e.len).sum::<u64>() <= 5 * K64);
    // The same export read as a source image: vma-capture's tests/nbd_image.rs.
    client.disconnect();
}

#[test]
fn odd_sizes_and_alignment_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU rounds a raw file of 1 MiB + 100 bytes up to whole sectors.
    let file = dir.path().join("odd.raw");
    let data = noise(9, (1 << 20) + 100);
    std::fs::write(&file, &data).unwrap();
    let server = QemuNbd::start(dir.path(), "odd", &["-f", "raw"], file.to_str().unwrap());
    let client = server.connect("odd");
    assert_eq!(client.size(), (1 << 20) + 512);
    let mut want = data.clone();
    want.resize((1 << 20) + 512, 0);
    let mut got = vec![1u8; want.len()];
    client.read_at(0, &mut got).unwrap();
    assert!(got == want);

    // A server that needs 4 KiB aligned requests: unaligned reads still work.
    let opts = format!(
        "driver=blkdebug,align=4096,image.driver=file,image.filename={}",
        file.display()
    );
    let aligned = QemuNbd::start(dir.path(), "aligned", &["--image-opts"], &opts);
    let client = aligned.connect("aligned");
    assert_eq!(client.block_sizes().min, 4096);
    for (at, len) in [
        (1u64, 10usize),
        (4000, 200),
        (12345, 70000),
        ((1 << 20) - 10, 522),
    ] {
        let mut buf = vec![1u8; len];
        client.read_at(at, &mut buf).unwrap();
        assert!(buf == want[at as usize..at as usize + len], "read at {at}");
    }
}

#[test]
fn server_errors_fail_only_their_request() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.raw");
    let data = noise(5, 4 << 20);
    std::fs::write(&file, &data).unwrap();
    // Reads of sector 4096 (byte 2 MiB) fail with EIO.
    let opts = format!(
        "driver=raw,file.driver=blkdebug,file.inject-error.0.event=none,file.inject-error.0.iotype=read,\
         file.inject-error.0.errno=5,file.inject-error.0.sector=4096,file.image.driver=file,file.image.filename={}",
        file.display()
    );
    let server = QemuNbd::start(dir.path(), "bad", &["--image-opts"], &opts);
    let client = server.connect("bad");
    let mut buf = vec![0u8; 4 << 20];
    match client.read_at(0, &mut buf) {
        Err(Error::Server {
            what, range, code, ..
        }) => {
            assert_eq!(what, "read");
            assert_eq!(code, wire::EIO);
            assert!(range.contains(&(2 << 20)), "{range:?}");
            let text = client.read_at(0, &mut buf).unwrap_err().to_string();
            assert!(text.contains("EIO") && text.contains("\"bad\""), "{text}");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    // The connection is still in sync: the bytes before and after work.
    let mut head = vec![0u8; 1 << 20];
    client.read_at(0, &mut head).unwrap();
    assert!(head == data[..1 << 20]);
    let mut tail = vec![0u8; 1 << 20];
    client.read_at(3 << 20, &mut tail).unwrap();
    assert!(tail == data[3 << 20..]);
    // Outside the export: refused without asking the server.
    let e = client.read_at((4 << 20) - 1, &mut [0u8; 2]).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    assert!(e.to_string().contains("4194303..4194305"), "{e}");
}

#[test]
fn unknown_export_and_missing_server_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.raw");
    std::fs::write(&file, vec![0u8; 4096]).unwrap();
    let server = QemuNbd::start(dir.path(), "here", &["-f", "raw"], file.to_str().unwrap());
    let e = NbdClient::connect_unix(&server.socket, "elsewhere").unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, Error::Handshake { .. })
            && text.contains("\"elsewhere\"")
            && text.contains("no export"),
        "{text}"
    );
    let e = NbdClient::connect_unix(&dir.path().join("none.sock"), "x").unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
}

#[test]
fn a_killed_server_breaks_the_connection_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.raw");
    std::fs::write(&file, noise(3, 1 << 20)).unwrap();
    let mut server = QemuNbd::start(dir.path(), "d", &["-f", "raw"], file.to_str().unwrap());
    let client = server.connect("d");
    let mut buf = vec![0u8; 4096];
    client.read_at(0, &mut buf).unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let e = client.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(e, Error::Broken { .. }), "{e}");
    let again = client.block_status(0, 4096).unwrap_err();
    assert!(matches!(again, Error::Broken { .. }), "{again}");
}

/// Accepts writes and drops them (reads get `EIO` from the server).
struct Discard(u64);

impl NbdExport for Discard {
    fn size(&self) -> u64 {
        self.0
    }
    fn flags(&self) -> ExportFlags {
        ExportFlags::WRITE_ONLY
    }
    fn write(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn simple_replies_and_no_block_status() {
    // This crate's server: no structured replies, reads answered with EIO.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("w.sock");
    let size = 3 * K64 + 100;
    let server =
        NbdServer::bind_unix(&socket, vec![Export::new("w", Arc::new(Discard(size)))]).unwrap();
    let client = NbdClient::connect_unix(&socket, "w").unwrap();
    assert_eq!(client.size(), size);
    assert!(!client.structured_replies() && !client.has_block_status());
    let extents = client.block_status(100, 1000).unwrap();
    assert_eq!(extents.len(), 1);
    assert!(extents[0].len == 1000 && !extents[0].zero);
    for _ in 0..2 {
        let mut buf = vec![0u8; 2 * K64 as usize];
        let e = client.read_at(10, &mut buf).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Server {
                    code: wire::EIO,
                    ..
                }
            ),
            "{e}"
        );
    }
    client.disconnect();
    server.shutdown();
}

/// A scripted server: handshake with structured replies and
/// `base:allocation` (context id 1), then `answer` gets the first read
/// request and writes whatever reply it wants.
fn scripted(
    dir: &Path,
    size: u64,
    answer: impl FnOnce(wire::Request, &mut std::os::unix::net::UnixStream) + Send + 'static,
) -> (PathBuf, std::thread::JoinHandle<()>) {
    let socket = dir.join("scripted.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let thread = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&wire::encode_greeting()).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        loop {
            let mut head = [0u8; 16];
            s.read_exact(&mut head).unwrap();
            let opt = wire::decode_option_header(&head).unwrap();
            let mut data = vec![0u8; opt.len as usize];
            s.read_exact(&mut data).unwrap();
            let reply = |r, p: &[u8]| wire::encode_option_reply(opt.option, r, p);
            match opt.option {
                wire::OPT_STRUCTURED_REPLY => s.write_all(&reply(wire::REP_ACK, &[])).unwrap(),
                wire::OPT_SET_META_CONTEXT => {
                    let mut p = 1u32.to_be_bytes().to_vec();
                    p.extend_from_slice(wire::BASE_ALLOCATION.as_bytes());
                    s.write_all(&reply(wire::REP_META_CONTEXT, &p)).unwrap();
                    s.write_all(&reply(wire::REP_ACK, &[])).unwrap();
                }
                wire::OPT_GO => {
                    s.write_all(&reply(wire::REP_INFO, &wire::encode_info_export(size, 1)))
                        .unwrap();
                    s.write_all(&reply(wire::REP_ACK, &[])).unwrap();
                    break;
                }
                _ => s.write_all(&reply(wire::REP_ERR_UNSUP, &[])).unwrap(),
            }
        }
        let mut head = [0u8; wire::REQUEST_LEN];
        s.read_exact(&mut head).unwrap();
        answer(wire::decode_request(&head).unwrap(), &mut s);
        // Keep the socket open until the client hangs up.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    (socket, thread)
}

/// A structured reply chunk.
fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = wire::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn data_chunk(done: bool, cookie: u64, at: u64, data: &[u8]) -> Vec<u8> {
    let mut p = at.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(u16::from(done), wire::REPLY_TYPE_OFFSET_DATA, cookie, &p)
}

#[test]
fn chunked_replies_in_any_order_are_assembled() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = scripted(dir.path(), 4096, |req, s| {
        assert_eq!((req.kind, req.offset, req.len), (wire::CMD_READ, 0, 4096));
        let c = req.cookie;
        s.write_all(&data_chunk(false, c, 3000, &[3u8; 1096]))
            .unwrap();
        let mut hole = 1000u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&1000u32.to_be_bytes());
        s.write_all(&chunk(0, wire::REPLY_TYPE_OFFSET_HOLE, c, &hole))
            .unwrap();
        s.write_all(&data_chunk(false, c, 2000, &[2u8; 1000]))
            .unwrap();
        s.write_all(&data_chunk(true, c, 0, &[1u8; 1000])).unwrap();
    });
    let client = NbdClient::connect_unix(&socket, "").unwrap();
    let mut buf = vec![9u8; 4096];
    client.read_at(0, &mut buf).unwrap();
    let mut want = vec![1u8; 1000];
    want.extend([0u8; 1000]);
    want.extend([2u8; 1000]);
    want.extend([3u8; 1096]);
    assert!(buf == want);
    client.disconnect();
    server.join().unwrap();
}

#[test]
fn protocol_violations_break_the_connection_without_panic() {
    type Script = fn(wire::Request, &mut std::os::unix::net::UnixStream);
    let cases: [(&str, Script); 5] = [
        ("overlap", |r, s| {
            s.write_all(&data_chunk(false, r.cookie, 0, &[1u8; 3000]))
                .unwrap();
            s.write_all(&data_chunk(true, r.cookie, 2000, &[1u8; 2096]))
                .unwrap();
        }),
        ("bytes 4000..4200 of a read of bytes 0..4096", |r, s| {
            s.write_all(&data_chunk(true, r.cookie, 4000, &[1u8; 200]))
                .unwrap();
        }),
        ("only 1000 bytes", |r, s| {
            s.write_all(&data_chunk(true, r.cookie, 0, &[1u8; 1000]))
                .unwrap();
        }),
        ("no request waits", |r, s| {
            s.write_all(&data_chunk(true, r.cookie + 7, 0, &[1u8; 4096]))
                .unwrap();
        }),
        ("magic", |_, s| {
            s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                .unwrap();
        }),
    ];
    for (what, script) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (socket, server) = scripted(dir.path(), 4096, script);
        let client = NbdClient::connect_unix(&socket, "").unwrap();
        let mut buf = vec![0u8; 4096];
        let e = client.read_at(0, &mut buf).unwrap_err();
        assert!(
            matches!(e, Error::Broken { .. }) && e.to_string().contains(what),
            "{what}: {e}"
        );
        // Later calls fail the same way instead of reading garbage.
        let later = client.read_at(0, &mut buf).unwrap_err();
        assert!(matches!(later, Error::Broken { .. }), "{what}: {later}");
        drop(client);
        server.join().unwrap();
    }
}

#[test]
fn error_chunks_carry_the_servers_message() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = scripted(dir.path(), 8192, |r, s| {
        let msg = b"disk on fire";
        let mut p = wire::ENOSPC.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        p.extend_from_slice(&4096u64.to_be_bytes());
        s.write_all(&chunk(0, wire::REPLY_TYPE_ERROR_OFFSET, r.cookie, &p))
            .unwrap();
        s.write_all(&chunk(1, wire::REPLY_TYPE_NONE, r.cookie, &[]))
            .unwrap();
    });
    let client = NbdClient::connect_unix(&socket, "").unwrap();
    let mut buf = vec![0u8; 8192];
    let e = client.read_at(0, &mut buf).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(
            e,
            Error::Server {
                code: wire::ENOSPC,
                ..
            }
        ) && text.contains("disk on fire")
            && text.contains("4096")
            && text.contains("0..8192"),
        "{text}"
    );
    client.disconnect();
    server.join().unwrap();
}

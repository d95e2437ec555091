//! `vma serve --tcp ADDR --tls-creds DIR`: NBD over TLS, judged by real
//! peers (qemu-img with a `tls-creds-x509` object, libnbd's `nbdinfo` with an
//! `nbds://` URI), with certificates made by the `openssl` command.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use vma_tests::*;

use vma_tests::{run_tool as run, tool_ok as ok};

fn openssl(dir: &Path, args: &[&str]) {
    require("openssl");
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "openssl {args:?}: {}", stderr(&o));
}

/// A certificate authority in `dir` (ca-cert.pem, ca-key.pem).
fn ca(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `dir/{role}-cert.pem` and `dir/{role}-key.pem` issued by the CA in
/// `ca_dir`, with `ca-cert.pem` beside them (the layout of QEMU's
/// tls-creds-x509 and of libnbd's tls-certificates).
fn issue(ca_dir: &Path, dir: &Path, role: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let ext = dir.join(format!("{role}.ext"));
    let usage = if role == "server" {
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    } else {
        "extendedKeyUsage=clientAuth\n"
    };
    std::fs::write(
        &ext,
        format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{usage}"),
    )
    .unwrap();
    let key = dir.join(format!("{role}-key.pem"));
    let csr = dir.join(format!("{role}.csr"));
    let cert = dir.join(format!("{role}-cert.pem"));
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            p(&key),
            "-out",
            p(&csr),
            "-subj",
            &format!("/CN=vma-test-{role}"),
        ],
    );
    openssl(
        ca_dir,
        &[
            "x509",
            "-req",
            "-in",
            p(&csr),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            p(&ext),
            "-out",
            p(&cert),
        ],
    );
    std::fs::copy(ca_dir.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
}

/// Credentials: `server/`, `client/` (a client certificate), `anon/` (the
/// CA only) and `other/` (a client of another CA, trusting only that CA).
struct Creds {
    server: PathBuf,
    client: PathBuf,
    anon: PathBuf,
    other: PathBuf,
}

fn creds(d: &Path) -> Creds {
    let (ca_dir, other_ca) = (d.join("ca"), d.join("other-ca"));
    ca(&ca_dir, "vma-test-ca");
    ca(&other_ca, "vma-test-other-ca");
    let c = Creds {
        server: d.join("server"),
        client: d.join("client"),
        anon: d.join("anon"),
        other: d.join("other"),
    };
    issue(&ca_dir, &c.server, "server");
    issue(&ca_dir, &c.client, "client");
    issue(&other_ca, &c.other, "client");
    std::fs::create_dir_all(&c.anon).unwrap();
    std::fs::copy(ca_dir.join("ca-cert.pem"), c.anon.join("ca-cert.pem")).unwrap();
    c
}

/// A `vma serve` on a free TCP port, stopped when dropped.
struct Serving {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Serving {
    fn start(archive: &Path, log: &Path, extra: &[&str]) -> Serving {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", p(archive), "--tcp", &addr];
        args.extend_from_slice(extra);
        let child = Command::new(vma_bin())
            .args(&args)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Serving {
            child,
            port,
            log: log.to_path_buf(),
        };
        let start = Instant::now();
        while !s.messages().contains("ready;") {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("vma serve exited ({status}): {}", s.messages());
            }
            assert!(start.elapsed().as_secs() < 30, "not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn messages(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `--image-opts` of export `name` through the TLS object `t`, if any.
    fn opts(&self, name: &str, tls: bool) -> String {
        let t = if tls { ",tls-creds=t" } else { "" };
        format!(
            "driver=nbd,host=127.0.0.1,port={},export={name}{t}",
            self.port
        )
    }

    fn stop(mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_object(dir: &Path) -> String {
    format!("tls-creds-x509,id=t,dir={},endpoint=client", p(dir))
}

/// `qemu-img compare` of `disk` with an export read through TLS with the
/// client credentials in `client`.
fn compare(s: &Serving, disk: &Path, name: &str, client: &Path) -> Output {
    run(
        "qemu-img",
        &[
            "compare",
            "--object",
            &tls_object(client),
            "--image-opts",
            &format!("driver=file,filename={}", p(disk)),
            &s.opts(name, true),
        ],
    )
}

/// An archive of two drives.
fn two_drives(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let disk = d.join("disk0.raw");
    sparse_image(
        &disk,
        8 * 1024 * 1024 + 333,
        &[(0, 700_000, 21), (5 << 20, 1 << 20, 22)],
    );
    let efi = d.join("efi.raw");
    std::fs::write(&efi, noise(23, 256 * 1024 + 5)).unwrap();
    let archive = d.join("backup.vma");
    let o = vma(&["create", "-q", p(&archive), p(&disk), p(&efi)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    (archive, disk, efi)
}

/// The option replies a client gets in clear: the greeting, then each
/// option of `options` answered (a raw NBD exchange, no client library).
fn clear_exchange(port: u16, options: &[(u32, &[u8])]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    for (option, data) in options {
        let mut o = b"IHAVEOPT".to_vec();
        o.extend_from_slice(&option.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        s.write_all(&o).unwrap();
    }
    let mut replies = Vec::new();
    let _ = s.read_to_end(&mut replies);
    replies
}

#[test]
fn tls_serves_qemu_and_libnbd_and_nothing_in_clear() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let c = creds(d);
    let (archive, disk, efi) = two_drives(d);
    let s = Serving::start(
        &archive,
        &d.join("serve.log"),
        &["--tls-creds", p(&c.server)],
    );
    assert!(
        s.messages()
            .contains(&format!("nbds://127.0.0.1:{}/disk0", s.port)),
        "{}",
        s.messages()
    );

    // QEMU's client, with the CA alone and with a client certificate.
    for (client, disk, name) in [(&c.anon, &disk, "disk0"), (&c.client, &efi, "efi")] {
        let o = compare(&s, disk, name, client);
        assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    }
    let info = ok(
        "qemu-img",
        &[
            "info",
            "--object",
            &tls_object(&c.anon),
            "--image-opts",
            &s.opts("disk0", true),
        ],
    );
    // QEMU rounds the size up to a multiple of 512.
    assert!(info.contains("(8389120 bytes)"), "{info}");

    // libnbd (nbdinfo), with an nbds:// URI.
    let url = format!(
        "nbds://127.0.0.1:{}/disk0?tls-certificates={}",
        s.port,
        p(&c.anon)
    );
    let size = ok("nbdinfo", &["--size", &url]);
    assert_eq!(size.trim(), "8388941");
    let map = ok("nbdinfo", &["--map", &url]);
    assert!(map.contains("hole"), "{map}");

    // Without TLS: QEMU is refused...
    let o = run(
        "qemu-img",
        &["info", "--image-opts", &s.opts("disk0", false)],
    );
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    // ... and a raw client learns nothing: every option but STARTTLS and
    // ABORT gets NBD_REP_ERR_TLS_REQD with no payload.
    let info_go = |name: &[u8]| {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(&0u16.to_be_bytes());
        v
    };
    let go = info_go(b"disk0");
    let replies = clear_exchange(s.port, &[(3, b""), (6, &go), (7, &go), (2, b"")]);
    let mut kinds = Vec::new();
    let mut rest = &replies[..];
    while rest.len() >= 20 {
        let num = |at: usize| u32::from_be_bytes(rest[at..at + 4].try_into().unwrap());
        kinds.push((num(8), num(12), num(16)));
        rest = &rest[20 + num(16) as usize..];
    }
    assert_eq!(
        kinds,
        vec![
            (3, 0x8000_0005, 0),
            (6, 0x8000_0005, 0),
            (7, 0x8000_0005, 0),
            (2, 1, 0)
        ]
    );
    assert!(rest.is_empty());
    // NBD_OPT_EXPORT_NAME, which cannot be refused, closes the connection.
    assert!(clear_exchange(s.port, &[(1, b"disk0")]).is_empty());

    // A client that trusts another CA refuses the server.
    let o = compare(&s, &disk, "disk0", &c.other);
    assert_ne!(code(&o), 0);
    let url = format!(
        "nbds://127.0.0.1:{}/disk0?tls-certificates={}",
        s.port,
        p(&c.other)
    );
    assert_ne!(code(&run("nbdinfo", &["--size", &url])), 0);
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn tls_verify_peer_requires_a_client_certificate_of_the_ca() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let c = creds(d);
    let (archive, disk, _) = two_drives(d);
    let s = Serving::start(
        &archive,
        &d.join("serve.log"),
        &["--tls-creds", p(&c.server), "--tls-verify-peer"],
    );
    let o = compare(&s, &disk, "disk0", &c.client);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let url = format!(
        "nbds://127.0.0.1:{}/disk0?tls-certificates={}",
        s.port,
        p(&c.client)
    );
    assert_eq!(ok("nbdinfo", &["--size", &url]).trim(), "8388941");
    // No client certificate: the client sees its connection end, the
    // server says why.
    let o = compare(&s, &disk, "disk0", &c.anon);
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    let start = Instant::now();
    while !s.messages().contains("TLS handshake with 127.0.0.1:") {
        assert!(start.elapsed().as_secs() < 10, "{}", s.messages());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.messages().contains("no certificates"), "{}", s.messages());
    // A certificate of another CA (the server's certificate also checked
    // against the server's CA, so that client trusts both).
    let mixed = d.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(c.other.join(f), mixed.join(f)).unwrap();
    }
    std::fs::copy(c.anon.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    let o = compare(&s, &disk, "disk0", &mixed);
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn tcp_needs_tls_or_an_explicit_flag_and_bad_credentials_are_named() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (archive, _, _) = two_drives(d);
    let o = vma(&["serve", p(&archive), "--tcp", "127.0.0.1:0"]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("--tls-creds"), "{}", stderr(&o));
    // An empty directory: the missing file is named.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = vma(&[
        "serve",
        p(&archive),
        "--tcp",
        "127.0.0.1:0",
        "--tls-creds",
        p(&empty),
    ]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("server-cert.pem"), "{}", stderr(&o));
    // --tls-verify-peer without ca-cert.pem.
    let c = creds(d);
    std::fs::remove_file(c.server.join("ca-cert.pem")).unwrap();
    let o = vma(&[
        "serve",
        p(&archive),
        "--tcp",
        "127.0.0.1:0",
        "--tls-creds",
        p(&c.server),
        "--tls-verify-peer",
    ]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("ca-cert.pem"), "{}", stderr(&o));
}

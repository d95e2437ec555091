//! TLS for the NBD server (`NBD_OPT_STARTTLS`), with X.509 credentials laid
//! out as QEMU's `tls-creds-x509` object lays them out.
//!
//! A credentials directory holds `server-cert.pem` (the server's certificate,
//! optionally followed by its chain) and `server-key.pem` (its private key:
//! PKCS#8, PKCS#1 or SEC1), and `ca-cert.pem` (the certificate authorities
//! that clients' certificates must chain to) when peers are verified. Other
//! files QEMU may find there (`ca-crl.pem`, `dh-params.pem`) are not read.
//!
//! After `NBD_OPT_STARTTLS` the connection is a rustls server connection
//! (ring's provider, rustls's safe default protocol versions) split into a
//! reading and a writing half, so that a connection's reader and reply
//! threads work as they do in clear: plaintext is taken from and given to
//! the shared rustls state under a short lock, and socket reads happen
//! outside it.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

/// The server certificate file of a credentials directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server key file of a credentials directory.
pub const SERVER_KEY: &str = "server-key.pem";
/// The certificate authorities file of a credentials directory.
pub const CA_CERT: &str = "ca-cert.pem";

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file is missing, unreadable or malformed.
    #[error(
        "{path}: {source} (a credentials directory holds {SERVER_CERT}, {SERVER_KEY} \
         and, to verify clients, {CA_CERT}, as QEMU's tls-creds-x509 lays them out)"
    )]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The certificate authorities cannot verify clients.
    #[error("the certificate authorities in {path}: {reason}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The certificate and key do not make a server configuration.
    #[error("the server certificate and key in {dir}: {source}")]
    Config {
        /// The credentials directory.
        dir: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// Called with a line saying which client failed the TLS handshake and why.
pub type RefusedLog = Arc<dyn Fn(&str) + Send + Sync>;

/// A TLS server configuration for [`crate::server::NbdServer::bind_tcp_tls`].
#[derive(Clone)]
pub struct TlsServerConfig(pub(crate) Arc<ServerConfig>, Option<RefusedLog>);

impl std::fmt::Debug for TlsServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServerConfig")
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl TlsServerConfig {
    /// Load the credentials in `dir`. With `verify_peer`, every client must
    /// present a certificate that chains to `dir/ca-cert.pem`; without, no
    /// client certificate is asked for.
    pub fn from_x509_dir(dir: &Path, verify_peer: bool) -> Result<TlsServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(&dir.join(SERVER_CERT))?;
        let key_path = dir.join(SERVER_KEY);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| TlsError::Pem {
            path: key_path,
            source,
        })?;
        let config_error = |source| TlsError::Config {
            dir: dir.to_path_buf(),
            source,
        };
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = if verify_peer {
            let ca_path = dir.join(CA_CERT);
            let mut roots = RootCertStore::empty();
            for cert in certificates(&ca_path)? {
                roots.add(cert).map_err(|e| TlsError::Ca {
                    path: ca_path.clone(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Ca {
                    path: ca_path.clone(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).map_err(config_error)?;
        Ok(TlsServerConfig(Arc::new(config), None))
    }

    /// Report each client that fails the TLS handshake (an unknown CA, no
    /// certificate where one is required) to `log`: the client only sees
    /// its connection end.
    pub fn on_refused(mut self, log: RefusedLog) -> TlsServerConfig {
        self.1 = Some(log);
        self
    }

    pub(crate) fn refused(&self, peer: &str, e: &io::Error) {
        if let Some(log) = &self.1 {
            log(&format!("TLS handshake with {peer} failed: {e}"));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Largest amount of encrypted data queued per write call.
const SEND_LIMIT: usize = 1 << 20;
/// Socket read size of the reading half.
const RAW_READ: usize = 64 * 1024;

/// The rustls state of one connection, shared by its two halves.
struct Shared<S> {
    conn: Mutex<ServerConnection>,
    /// The socket's writing side and a buffer of encrypted records; taken
    /// before `conn` so that records reach the socket in order.
    out: Mutex<(S, Vec<u8>)>,
}

impl<S: Write> Shared<S> {
    /// Send what rustls has queued.
    fn send(&self, plaintext: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.out);
        let (socket, records) = &mut *out;
        records.clear();
        let written = {
            let mut conn = lock(&self.conn);
            let written = if plaintext.is_empty() {
                0
            } else {
                conn.writer().write(plaintext)?
            };
            while conn.wants_write() {
                conn.write_tls(records)?;
            }
            written
        };
        socket.write_all(records)?;
        Ok(written)
    }
}

/// The reading half of a TLS connection: plaintext from the client.
pub(crate) struct TlsReader<S> {
    shared: Arc<Shared<S>>,
    socket: S,
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

/// The writing half of a TLS connection: plaintext to the client.
pub(crate) struct TlsWriter<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for TlsWriter<S> {
    fn clone(&self) -> Self {
        TlsWriter {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Run the TLS handshake on `socket` (whose clone `write_socket` becomes
/// the writing side) and split the connection into its two halves. A
/// client that fails the handshake (an unknown CA, no certificate where
/// one is required) gets an alert and an `InvalidData` error here.
pub(crate) fn accept<S: Read + Write>(
    config: &TlsServerConfig,
    mut socket: S,
    write_socket: S,
) -> io::Result<(TlsReader<S>, TlsWriter<S>)> {
    let mut conn = ServerConnection::new(Arc::clone(&config.0)).map_err(tls_error)?;
    conn.set_buffer_limit(Some(SEND_LIMIT));
    while conn.is_handshaking() {
        conn.complete_io(&mut socket)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut socket)?;
    }
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        out: Mutex::new((write_socket, Vec::new())),
    });
    let reader = TlsReader {
        shared: Arc::clone(&shared),
        socket,
        raw: vec![0; RAW_READ],
        start: 0,
        end: 0,
    };
    Ok((reader, TlsWriter { shared }))
}

impl<S: Write> TlsWriter<S> {
    /// Tell the client that nothing more follows (`close_notify`).
    pub(crate) fn close(&self) {
        lock(&self.shared.conn).send_close_notify();
        let _ = self.shared.send(&[]);
    }
}

impl<S: Write> Write for TlsWriter<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Read + Write> Read for TlsReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let reply_needed = {
                let mut conn = lock(&self.shared.conn);
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start == self.end {
                    None
                } else {
                    // Fed only while no plaintext is waiting, so rustls's
                    // plaintext buffer never overflows.
                    let mut pending = &self.raw[self.start..self.end];
                    let before = pending.len();
                    let fed = conn.read_tls(&mut pending);
                    self.start += before - pending.len();
                    fed?;
                    let processed = conn.process_new_packets().map(|_| ());
                    Some((processed, conn.wants_write()))
                }
            };
            match reply_needed {
                Some((processed, wants_write)) => {
                    // Alerts, key updates: sent in order with the replies.
                    if wants_write {
                        self.shared.send(&[])?;
                    }
                    processed.map_err(tls_error)?;
                }
                None => {
                    let n = self.socket.read(&mut self.raw)?;
                    self.start = 0;
                    self.end = n;
                    if n == 0 {
                        // End of stream: rustls then answers reads with
                        // end of file (after close_notify) or an error.
                        lock(&self.shared.conn).read_tls(&mut io::empty())?;
                    }
                }
            }
        }
    }
}

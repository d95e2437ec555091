//! `vma serve`: every drive of an archive (any point of a chain) as a
//! read-only NBD export, for QEMU, `qemu-img`, `nbdcopy` and friends.
//!
//! The NBD protocol is `vma-nbd`'s server; this module only says what an
//! export is ([`DriveExport`]: the chain reader, which checks every extent
//! it returns as `extract` does) and runs the server until a signal.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use vma_core::chain::Chain;
use vma_core::image::source::Stretch;
use vma_core::{DriveId, Reader};
use vma_nbd::server::{Export, ExportFlags, NbdExport, NbdServer, StatusExtent};
use vma_nbd::tls::TlsServerConfig;
use vma_nbd::wire;

/// Set by SIGINT or SIGTERM: stop serving.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

/// Arguments of `vma serve`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ServeArgs {
    /// Archive file (native 3.0 or 2.0, any point of an incremental chain,
    /// or an uncompressed Proxmox VMA v1).
    archive: PathBuf,
    /// An ancestor of an incremental archive (repeatable); by default they
    /// are looked for beside the archive, by uuid.
    #[arg(long = "parent", value_name = "PATH")]
    parents: Vec<PathBuf>,
    /// Unix socket to listen on (a stale socket left there is replaced;
    /// default: `vma-<archive name>.sock` in $XDG_RUNTIME_DIR or /tmp).
    #[arg(long, value_name = "PATH", conflicts_with = "tcp")]
    socket: Option<PathBuf>,
    /// Listen on TCP at ADDR (host:port) instead of a unix socket. Needs
    /// --tls-creds (or, on a trusted network, --insecure-plain-tcp).
    #[arg(long, value_name = "ADDR")]
    tcp: Option<SocketAddr>,
    /// Directory of X.509 credentials for TLS over TCP, as QEMU's
    /// tls-creds-x509 lays it out: server-cert.pem, server-key.pem and,
    /// with --tls-verify-peer, ca-cert.pem. Every client must start TLS
    /// before anything else (NBD_OPT_STARTTLS).
    #[arg(long, value_name = "DIR", requires = "tcp")]
    tls_creds: Option<PathBuf>,
    /// Require a client certificate issued by the authorities in
    /// DIR/ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    tls_verify_peer: bool,
    /// Serve TCP without TLS: anyone who can reach the port reads the
    /// drives, and nothing protects the bytes on the way.
    #[arg(long, requires = "tcp", conflicts_with = "tls_creds")]
    insecure_plain_tcp: bool,
    /// Serve a damaged or truncated archive: one pass first checks every
    /// extent; ranges that cannot be read are answered with zeros instead
    /// of an I/O error, listed on stderr first and logged when read.
    #[arg(long)]
    salvage: bool,
    /// MiB of decoded extents to keep in memory.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    cache_size: usize,
    /// Run in the background once the exports are ready (messages go to
    /// --log, or nowhere); stop it with SIGTERM (see --pid-file).
    #[arg(long)]
    detach: bool,
    /// Write the serving process's id to this file (removed on exit).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// With --detach: append messages (failed reads) to this file.
    #[arg(long, value_name = "FILE", requires = "detach")]
    log: Option<PathBuf>,
    /// Internal: run as the detached serving process, reporting readiness
    /// on standard output.
    #[arg(long, hide = true)]
    daemon_child: bool,
}

/// What damage does to a read.
type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// One drive of a chain's newest point in time as a read-only NBD export.
/// Reads go through the chain reader (every extent checked against its
/// digests and position, as `extract` checks it); block status comes from
/// the indexes alone.
pub struct DriveExport {
    chain: Arc<Chain>,
    id: DriveId,
    name: String,
    size: u64,
    salvage: bool,
    log: Log,
}

/// Most descriptors in one block status answer.
const MAX_STATUS_EXTENTS: usize = 1024;

impl DriveExport {
    fn io_error(&self, offset: u64, len: usize, e: &vma_core::Error) -> std::io::Error {
        let end = offset + len as u64;
        let hint = if e.is_damage() {
            " (serve with --salvage to read damaged ranges as zeros)"
        } else {
            ""
        };
        let msg = format!("drive {} bytes {offset}..{end}: {e}{hint}", self.name);
        (self.log)(&msg);
        std::io::Error::other(msg)
    }
}

impl NbdExport for DriveExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags::READ_ONLY
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let result = if self.salvage {
            self.chain.read_salvaging(self.id, offset, buf).map(|lost| {
                for l in lost {
                    (self.log)(&format!(
                        "bytes {}..{} read as zeros (salvage): {}",
                        l.bytes.start, l.bytes.end, l.error
                    ));
                }
            })
        } else {
            self.chain.read_at(self.id, offset, buf)
        };
        result.map_err(|e| self.io_error(offset, buf.len(), &e))
    }

    fn meta_contexts(&self) -> Vec<String> {
        vec![wire::BASE_ALLOCATION.to_string()]
    }

    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> std::io::Result<Vec<StatusExtent>> {
        if context != wire::BASE_ALLOCATION {
            return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_STATUS_EXTENTS {
            let stretch = self
                .chain
                .status(self.id, pos)
                .map_err(|e| self.io_error(pos, 0, &e))?;
            let (flags, n) = match stretch {
                Stretch::Data(n) => (0, n),
                Stretch::Zero(n) => (wire::STATE_HOLE | wire::STATE_ZERO, n),
            };
            let n = n.clamp(1, end - pos);
            match out.last_mut() {
                Some(last) if last.flags == flags => last.len += n,
                _ => out.push(StatusExtent { len: n, flags }),
            }
            pos += n;
        }
        Ok(out)
    }
}

/// The default socket path for `archive`.
fn default_socket(archive: &Path) -> PathBuf {
    let name = archive
        .file_name()
        .map_or_else(|| "archive".into(), |n| n.to_string_lossy().into_owned());
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("vma-{name}.sock"))
}

/// Open the chain (with `--salvage`: salvage the newest archive and print
/// what is lost) and make one export per drive.
fn exports(args: &ServeArgs, log: &Log) -> Result<Vec<Export>> {
    let opening = || format!("opening {}", args.archive.display());
    let newest = if args.salvage {
        let (reader, salvage) = Reader::open_salvage(&args.archive, 0).with_context(opening)?;
        if !salvage.is_clean() {
            let report = vma_core::read::damage::DamageReport::of_salvage(&salvage);
            crate::output::print_damage_text(&report, "served as zeros");
        }
        reader
    } else {
        Reader::open(&args.archive).with_context(opening)?
    };
    let chain = Chain::with_newest(newest, &args.parents).with_context(opening)?;
    chain.refuse_interrupted(|_| true)?;
    for link in chain.links() {
        link.set_cache_bytes(args.cache_size.max(1) << 20);
    }
    let chain = Arc::new(chain);
    let mut out = Vec::new();
    for d in &chain.header().drives {
        let export = DriveExport {
            chain: chain.clone(),
            id: d.id,
            name: d.name.clone(),
            size: d.size,
            salvage: args.salvage,
            log: log.clone(),
        };
        out.push(Export::new(d.name.clone(), Arc::new(export)));
    }
    if out.is_empty() {
        bail!("{} holds no drives to serve", args.archive.display());
    }
    Ok(out)
}

/// Remove a socket file at `path` that nobody listens on any more (left by
/// a killed server), so that a restarted server takes its place and QEMU's
/// NBD client reconnects to it. Anything else there is left alone.
fn remove_stale_socket(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; choose another --socket",
            path.display()
        );
    }
    match UnixStream::connect(path) {
        Ok(_) => bail!(
            "another server already listens on {}; stop it or choose another --socket",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("checking the socket {}", path.display())),
    }
}

/// Bind the server where the flags say.
fn bind(args: &ServeArgs, exports: Vec<Export>, log: &Log) -> Result<(NbdServer, Vec<String>)> {
    let names: Vec<String> = exports.iter().map(|e| e.name.clone()).collect();
    if let Some(addr) = args.tcp {
        let (server, scheme) = if let Some(dir) = &args.tls_creds {
            let tls = TlsServerConfig::from_x509_dir(dir, args.tls_verify_peer)
                .with_context(|| format!("loading the TLS credentials in {}", dir.display()))?
                .on_refused(log.clone());
            let server = NbdServer::bind_tcp_tls(addr, exports, tls);
            (server, "nbds")
        } else if args.insecure_plain_tcp {
            (NbdServer::bind_tcp(addr, exports), "nbd")
        } else {
            bail!(
                "--tcp needs --tls-creds DIR (X.509 credentials, see vma serve --help); \
                 --insecure-plain-tcp serves the drives unencrypted to anyone who can \
                 reach the port, on a trusted network only; or use --socket"
            );
        };
        let server = server.with_context(|| format!("listening on TCP {addr}"))?;
        let bound = server.tcp_address().unwrap_or(addr);
        let urls = names
            .iter()
            .map(|n| format!("{scheme}://{bound}/{n}"))
            .collect();
        return Ok((server, urls));
    }
    let path = match &args.socket {
        Some(p) => p.clone(),
        None => default_socket(&args.archive),
    };
    let path =
        std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))?;
    remove_stale_socket(&path)?;
    let server = NbdServer::bind_unix(&path, exports)
        .with_context(|| format!("listening on {}", path.display()))?;
    let urls = names
        .iter()
        .map(|n| format!("nbd+unix:///{n}?socket={}", path.display()))
        .collect();
    Ok((server, urls))
}

/// `vma serve`.
pub(crate) fn serve(args: &ServeArgs) -> Result<()> {
    crate::mount::return_large_buffers();
    if args.daemon_child {
        return daemon_child(args);
    }
    if args.detach {
        return detach(args);
    }
    let log: Log = Arc::new(|msg: &str| eprintln!("vma serve: {msg}"));
    let (server, urls) = bind(args, exports(args, &log)?, &log)?;
    let _pid = PidFile::write(args.pid_file.as_deref())?;
    for url in &urls {
        eprintln!("vma serve: {url}");
    }
    eprintln!("vma serve: ready; SIGINT or SIGTERM stops serving");
    wait_for_stop();
    server.shutdown();
    eprintln!("vma serve: stopped");
    Ok(())
}

fn wait_for_stop() {
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pid file, removed when dropped.
struct PidFile(Option<PathBuf>);

impl PidFile {
    fn write(path: Option<&Path>) -> Result<PidFile> {
        let Some(path) = path else {
            return Ok(PidFile(None));
        };
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing the pid file {}", path.display()))?;
        Ok(PidFile(Some(path.to_path_buf())))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `p` made absolute; an object location (`s3://...`) as it is.
fn absolute(p: &Path) -> Result<PathBuf> {
    if vma_core::storage::is_remote(p) {
        return Ok(p.to_path_buf());
    }
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Re-run ourselves detached and wait until it serves (or fails).
fn detach(args: &ServeArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding the vma executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg(absolute(&args.archive)?)
        .arg("--daemon-child")
        .arg("--detach")
        .arg("--cache-size")
        .arg(args.cache_size.to_string());
    for p in &args.parents {
        cmd.arg("--parent").arg(absolute(p)?);
    }
    let socket = match (&args.socket, args.tcp) {
        (Some(s), _) => Some(s.clone()),
        (None, None) => Some(default_socket(&args.archive)),
        (None, Some(_)) => None,
    };
    if let Some(s) = socket {
        cmd.arg("--socket").arg(absolute(&s)?);
    }
    if let Some(addr) = args.tcp {
        cmd.arg("--tcp").arg(addr.to_string());
    }
    if let Some(t) = &args.tls_creds {
        cmd.arg("--tls-creds").arg(absolute(t)?);
    }
    if args.tls_verify_peer {
        cmd.arg("--tls-verify-peer");
    }
    if args.insecure_plain_tcp {
        cmd.arg("--insecure-plain-tcp");
    }
    if args.salvage {
        cmd.arg("--salvage");
    }
    if let Some(p) = &args.pid_file {
        cmd.arg("--pid-file").arg(absolute(p)?);
    }
    if let Some(l) = &args.log {
        cmd.arg("--log").arg(absolute(l)?);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .current_dir("/");
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the serving process")?;
    let out = child.stdout.take().expect("piped stdout");
    let mut out = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        out.read_line(&mut line)
            .context("waiting for the serving process")?;
        match line.trim_end() {
            "" => {
                let status = child.wait().ok();
                bail!("the serving process ended before it was ready ({status:?})");
            }
            "ready" => {
                eprintln!("vma serve: serving in process {}", child.id());
                return Ok(());
            }
            msg => {
                if let Some(url) = msg.strip_prefix("url ") {
                    eprintln!("vma serve: {url}");
                } else {
                    let _ = child.wait();
                    return match msg.strip_prefix("damage: ") {
                        Some(damage) => Err(crate::Damage(damage.to_string()).into()),
                        None => Err(anyhow!("{}", msg.trim_start_matches("error: "))),
                    };
                }
            }
        }
    }
}

/// The detached serving process: report the URLs and readiness (or the
/// error) on stdout, let stdout and stderr go, serve until a signal.
fn daemon_child(args: &ServeArgs) -> Result<()> {
    let report = |msg: &str| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{msg}");
        let _ = out.flush();
    };
    let result = (|| -> Result<(NbdServer, PidFile)> {
        let log: Log = match &args.log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening log file {}", path.display()))?;
                let f = std::sync::Mutex::new(f);
                Arc::new(move |msg: &str| {
                    if let Ok(mut f) = f.lock() {
                        let _ = writeln!(f, "vma serve: {msg}");
                    }
                })
            }
            None => Arc::new(|_: &str| {}),
        };
        let (server, urls) = bind(args, exports(args, &log)?, &log)?;
        let pid = PidFile::write(args.pid_file.as_deref())?;
        for url in urls {
            report(&format!("url {url}"));
        }
        Ok((server, pid))
    })();
    match result {
        Ok((server, pid)) => {
            report("ready");
            release_stdio();
            wait_for_stop();
            server.shutdown();
            drop(pid);
            Ok(())
        }
        Err(e) => {
            let kind = if crate::is_damage(&e) {
                "damage"
            } else {
                "error"
            };
            report(&format!("{kind}: {}", crate::one_line(&e)));
            Err(e)
        }
    }
}

/// Point stdout and stderr at /dev/null so the parent's pipe closes and
/// nothing is written to a terminal that may be gone.
fn release_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::unix::io::AsRawFd;
        // SAFETY: dup2 onto our own stdout and stderr descriptors.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
            libc::dup2(null.as_raw_fd(), libc::STDERR_FILENO);
        }
    }
}

//! Restoring drives into existing targets: block devices, raw files, qcow2
//! (and other QEMU formats) images, standard output.
//!
//! One mechanism serves `vma extract --drive NAME --to PATH` and the
//! Proxmox-compatible `vma extract -r FIFO` (see `pve.rs`): both name a
//! [`TargetSpec`] per drive and call [`restore`], which makes one pass
//! over the archive and hands every cluster to its drive's [`Target`].
//!
//! How each kind of target gets the bytes, and how zeros are established
//! where the target must read as zeros ([`Zeros::Establish`]):
//!
//! | target | data | zeros (establish) | zeros (skip) |
//! |---|---|---|---|
//! | block device | `pwrite` | read; `BLKZEROOUT` only where it does not read as zeros | nothing |
//! | raw file | `pwrite` | punch a hole (`FALLOC_FL_PUNCH_HOLE`; written zeros where that fails) | nothing |
//! | qcow2, vmdk, ... | NBD write through `qemu-storage-daemon` | `NBD_CMD_WRITE_ZEROES` (zero clusters) | nothing |
//! | standard output | written in order | written (everything is written) | written |
//!
//! A target is never truncated or grown: it must be at least as large as
//! the drive, and bytes past the drive's end are never touched.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vma_core::extent::{ClusterData, DecodedExtent};
use vma_core::format::{RunKind, CLUSTER_SIZE};
use vma_core::{ArchiveStream, DriveId, Header, PassOptions};

const CS: u64 = CLUSTER_SIZE as u64;
const BLOCK: u64 = 4096;
/// Out-of-order clusters a standard-output target holds back at most.
const STDOUT_PENDING_LIMIT: usize = 256 << 20;

/// How zero regions of the drive reach the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zeros {
    /// The target already reads as zeros (freshly allocated, pre-zeroed):
    /// zero regions are not touched (Proxmox's `0:`).
    Skip,
    /// Make zero regions read as zeros, writing only where the target
    /// does not already (Proxmox's `1:`; the default of `--to`).
    Establish,
}

/// Where one drive goes and how.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    /// A path, or `-` for standard output.
    pub path: String,
    /// The image format (`raw`, `qcow2`, `vmdk`, ...): given, else `qcow2`
    /// and `vmdk` by file name, else raw. Never probed from the contents.
    pub format: Option<String>,
    /// Zero handling.
    pub zeros: Zeros,
    /// Write bandwidth limit in bytes per second.
    pub bps: Option<u64>,
    /// Throttle group: targets naming the same group share one limit.
    pub group: Option<String>,
    /// How many bytes the target may be larger than the drive (`None`:
    /// any; Proxmox allows 4 MiB).
    pub max_slack: Option<u64>,
    /// Check free space of file targets before writing.
    pub space_check: bool,
    /// How writes reach stable storage.
    pub cache: Cache,
}

/// QEMU's cache modes (the `cache=` of a Proxmox map line): how writes
/// reach stable storage. Targets in QEMU formats get exactly QEMU's
/// meaning (`cache.direct`, `cache.no-flush` and the export's
/// `writethrough`); raw files and block devices, written in place:
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cache {
    /// Through the page cache, flushed (fsync) once at the end.
    #[default]
    Writeback,
    /// Every write synchronous (`O_DSYNC`).
    Writethrough,
    /// QEMU's `O_DIRECT` mode; raw targets: every write synchronous
    /// (`O_DSYNC`) through the page cache, since O_DIRECT would need
    /// aligned buffers on every path.
    None,
    /// `O_DIRECT` and synchronous in QEMU; raw targets: `O_DSYNC`.
    DirectSync,
    /// Through the page cache and never flushed (the data may be lost on a
    /// crash shortly after the restore).
    Unsafe,
}

impl Cache {
    /// A mode by QEMU's name (`off` is `none`).
    pub fn parse(mode: &str) -> Option<Cache> {
        Some(match mode {
            "writeback" => Cache::Writeback,
            "writethrough" => Cache::Writethrough,
            "none" | "off" => Cache::None,
            "directsync" => Cache::DirectSync,
            "unsafe" => Cache::Unsafe,
            _ => return Option::None,
        })
    }

    /// Whether raw targets are opened with `O_DSYNC`.
    fn dsync(self) -> bool {
        matches!(self, Cache::Writethrough | Cache::None | Cache::DirectSync)
    }

    /// `cache.direct`, `cache.no-flush` and the export's `writethrough`.
    fn qemu_options(self) -> (bool, bool, bool) {
        match self {
            Cache::Writeback => (false, false, false),
            Cache::Writethrough => (false, false, true),
            Cache::None => (true, false, false),
            Cache::DirectSync => (true, false, true),
            Cache::Unsafe => (false, true, false),
        }
    }
}

impl TargetSpec {
    /// A target at `path` with the defaults of `--to`.
    pub fn new(path: &str) -> TargetSpec {
        TargetSpec {
            path: path.to_owned(),
            format: None,
            zeros: Zeros::Establish,
            bps: None,
            group: None,
            max_slack: None,
            space_check: true,
            cache: Cache::Writeback,
        }
    }

    fn format(&self) -> String {
        if let Some(f) = &self.format {
            return f.clone();
        }
        let lower = self.path.to_ascii_lowercase();
        if lower.ends_with(".qcow2") {
            "qcow2".into()
        } else if lower.ends_with(".vmdk") {
            "vmdk".into()
        } else {
            "raw".into()
        }
    }
}

/// A shared write-bandwidth limit.
struct Throttle {
    bps: u64,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    fn account(&mut self, n: u64) {
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bps as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

enum Kind {
    /// A block device or a raw file, written in place.
    Direct { file: File, block_device: bool },
    /// An image in a QEMU format, written through an NBD export of
    /// `qemu-storage-daemon`.
    Nbd {
        client: Option<vma_nbd::client::NbdClient>,
        daemon: Child,
        dir: PathBuf,
    },
    /// Standard output, written in drive order.
    Stdout {
        out: std::io::BufWriter<std::io::Stdout>,
        next: u64,
        pending: BTreeMap<u64, Vec<u8>>,
        pending_bytes: usize,
    },
}

/// One opened restore target for one drive.
pub struct Target {
    /// The drive's name.
    pub drive: String,
    /// The target as given.
    pub path: String,
    size: u64,
    zeros: Zeros,
    kind: Kind,
    throttle: Option<Rc<RefCell<Throttle>>>,
    /// Zero range waiting to be established (coalesced).
    zero_run: Option<(u64, u64)>,
    cache: Cache,
    /// Bytes written as data.
    pub written: u64,
}

/// Throttle groups of one restore.
#[derive(Default)]
pub struct Groups(HashMap<String, Rc<RefCell<Throttle>>>);

/// The size of an open file or block device.
fn file_size(file: &File, block_device: bool) -> std::io::Result<u64> {
    if block_device {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(file.metadata()?.len())
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl Target {
    /// Open the target of drive `drive` (`size` bytes): it must exist and
    /// be at least `size` bytes.
    pub fn open(
        spec: &TargetSpec,
        drive: &str,
        size: u64,
        data_bytes: Option<u64>,
        groups: &mut Groups,
    ) -> Result<Target> {
        let throttle = spec.bps.filter(|b| *b > 0).map(|bps| {
            let key = spec.group.clone().unwrap_or_else(|| spec.path.clone());
            groups
                .0
                .entry(key)
                .or_insert_with(|| {
                    Rc::new(RefCell::new(Throttle {
                        bps,
                        start: Instant::now(),
                        bytes: 0,
                    }))
                })
                .clone()
        });
        let kind = if spec.path == "-" {
            Kind::Stdout {
                out: std::io::BufWriter::with_capacity(1 << 20, std::io::stdout()),
                next: 0,
                pending: BTreeMap::new(),
                pending_bytes: 0,
            }
        } else {
            if spec.path.contains("://") || spec.path.starts_with("rbd:") {
                bail!(
                    "target {}: QEMU protocol targets are not supported; map the volume to a block device (krbd, iscsiadm) and give its path",
                    spec.path
                );
            }
            let path = Path::new(&spec.path);
            let meta = std::fs::metadata(path).with_context(|| {
                format!(
                    "target {} of drive {drive}: the target must exist (an image of at least {size} bytes, or a block device)",
                    spec.path
                )
            })?;
            let block_device = meta.file_type().is_block_device();
            if !block_device && !meta.is_file() {
                bail!(
                    "target {} of drive {drive} is neither a regular file nor a block device",
                    spec.path
                );
            }
            let format = spec.format();
            if format == "raw" {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(
                        libc::O_NONBLOCK | if spec.cache.dsync() { libc::O_DSYNC } else { 0 },
                    )
                    .open(path)
                    .with_context(|| format!("opening target {} of drive {drive}", spec.path))?;
                Kind::Direct { file, block_device }
            } else {
                start_nbd(path, &format, block_device, spec.cache)
                    .with_context(|| format!("opening {format} target {}", spec.path))?
            }
        };
        let target = Target {
            drive: drive.to_owned(),
            path: spec.path.clone(),
            size,
            zeros: spec.zeros,
            kind,
            throttle,
            zero_run: None,
            cache: spec.cache,
            written: 0,
        };
        let len = target.len()?;
        if let Some(len) = len {
            let slack = spec.max_slack.unwrap_or(u64::MAX);
            if len < size || len - size > slack {
                return Err(SizeMismatch {
                    drive: drive.to_owned(),
                    path: spec.path.clone(),
                    target: len,
                    drive_size: size,
                }
                .into());
            }
        }
        if spec.space_check {
            target.check_space(data_bytes)?;
        }
        Ok(target)
    }

    /// The target's size (None for standard output).
    fn len(&self) -> Result<Option<u64>> {
        Ok(match &self.kind {
            Kind::Direct { file, block_device } => Some(
                file_size(file, *block_device)
                    .with_context(|| format!("size of target {}", self.path))?,
            ),
            Kind::Nbd { client, .. } => client.as_ref().map(|c| c.size()),
            Kind::Stdout { .. } => None,
        })
    }

    /// Refuse a file target whose file system cannot hold the drive's data.
    fn check_space(&self, data_bytes: Option<u64>) -> Result<()> {
        let file = match &self.kind {
            Kind::Direct {
                file,
                block_device: false,
            } => file,
            _ => return Ok(()),
        };
        let meta = file.metadata()?;
        use std::os::unix::fs::MetadataExt;
        let allocated = meta.blocks() * 512;
        let need = data_bytes.unwrap_or(0).saturating_sub(allocated);
        // SAFETY: fstatvfs fills the struct we pass.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
            return Ok(());
        }
        let free = st.f_bavail as u64 * st.f_frsize as u64;
        if need > free {
            bail!(
                "not enough free space for drive {} in {}: its data needs {} more, the file system has {} free; free some space or restore elsewhere (--no-space-check to try anyway)",
                self.drive,
                self.path,
                vma_core::util::human_bytes(need),
                vma_core::util::human_bytes(free)
            );
        }
        Ok(())
    }

    /// Write data bytes at `offset` (clipped to the drive's size).
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset >= self.size {
            return Ok(());
        }
        let data = &data[..data.len().min((self.size - offset) as usize)];
        self.flush_zeros()?;
        self.put(offset, data)?;
        self.written += data.len() as u64;
        if let Some(t) = &self.throttle {
            t.borrow_mut().account(data.len() as u64);
        }
        Ok(())
    }

    fn put(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let path = &self.path;
        match &mut self.kind {
            Kind::Direct { file, .. } => file
                .write_all_at(data, offset)
                .with_context(|| format!("writing bytes {offset}.. of {path}")),
            Kind::Nbd { client, .. } => client
                .as_ref()
                .expect("open")
                .write_at(offset, data)
                .with_context(|| format!("writing bytes {offset}.. of {path}")),
            Kind::Stdout {
                out,
                next,
                pending,
                pending_bytes,
            } => {
                if offset != *next {
                    if offset < *next {
                        bail!("drive {}: bytes at {offset} arrived twice", self.drive);
                    }
                    *pending_bytes += data.len();
                    if *pending_bytes > STDOUT_PENDING_LIMIT {
                        bail!(
                            "drive {}: the archive stores its clusters far out of order, so they cannot be streamed to standard output; restore to a file or device instead",
                            self.drive
                        );
                    }
                    pending.insert(offset, data.to_vec());
                    return Ok(());
                }
                out.write_all(data).context("writing standard output")?;
                *next += data.len() as u64;
                while let Some(entry) = pending.first_entry() {
                    if *entry.key() != *next {
                        break;
                    }
                    let bytes = entry.remove();
                    *pending_bytes -= bytes.len();
                    out.write_all(&bytes).context("writing standard output")?;
                    *next += bytes.len() as u64;
                }
                Ok(())
            }
        }
    }

    /// Bytes `offset..offset+len` of the drive are zeros.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if offset >= self.size {
            return Ok(());
        }
        let end = (offset + len).min(self.size);
        if let Kind::Stdout { .. } = self.kind {
            let zeros = vec![0u8; CS as usize];
            let mut at = offset;
            while at < end {
                let n = (end - at).min(CS);
                self.put(at, &zeros[..n as usize])?;
                at += n;
            }
            return Ok(());
        }
        if self.zeros == Zeros::Skip {
            return Ok(());
        }
        match self.zero_run {
            Some((s, e)) if e == offset && e - s < (64 << 20) => self.zero_run = Some((s, end)),
            _ => {
                self.flush_zeros()?;
                self.zero_run = Some((offset, end));
            }
        }
        Ok(())
    }

    /// Establish the pending zero range.
    fn flush_zeros(&mut self) -> Result<()> {
        let Some((start, end)) = self.zero_run.take() else {
            return Ok(());
        };
        let path = self.path.clone();
        match &mut self.kind {
            Kind::Direct {
                file,
                block_device: true,
            } => {
                // Read first: only what does not read as zeros is zeroed.
                let mut buf = vec![0u8; (1 << 20).min(end - start) as usize];
                let mut at = start;
                while at < end {
                    let n = (end - at).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], at)
                        .with_context(|| format!("reading bytes {at}.. of {path}"))?;
                    let mut i = 0;
                    while i < n {
                        let step = (BLOCK as usize).min(n - i);
                        if buf[i..i + step].iter().any(|b| *b != 0) {
                            // A run of non-zero blocks.
                            let mut j = i + step;
                            while j < n {
                                let s = (BLOCK as usize).min(n - j);
                                if buf[j..j + s].iter().all(|b| *b == 0) {
                                    break;
                                }
                                j += s;
                            }
                            zero_out(file, at + i as u64, (j - i) as u64).with_context(|| {
                                format!("zeroing bytes {}.. of {path}", at + i as u64)
                            })?;
                            i = j;
                        } else {
                            i += step;
                        }
                    }
                    at += n as u64;
                }
                Ok(())
            }
            Kind::Direct { file, .. } => {
                // SAFETY: fallocate on a descriptor we own.
                let r = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        start as libc::off_t,
                        (end - start) as libc::off_t,
                    )
                };
                if r != 0 {
                    write_zeros(file, start, end - start)
                        .with_context(|| format!("zeroing bytes {start}.. of {path}"))?;
                }
                Ok(())
            }
            Kind::Nbd { client, .. } => client
                .as_ref()
                .expect("open")
                .write_zeroes(start, end - start)
                .with_context(|| format!("zeroing bytes {start}.. of {path}")),
            Kind::Stdout { .. } => Ok(()),
        }
    }

    /// Hand one cluster to the target.
    fn cluster(&mut self, cluster: u64, data: &ClusterData<'_>) -> Result<()> {
        let base = cluster * CS;
        match *data {
            ClusterData::Zero => self.zero(base, CS),
            ClusterData::Unchanged => bail!(
                "drive {}: the archive is incremental; restore it from its chain with `vma extract` into a directory",
                self.drive
            ),
            ClusterData::Data { mask: 0xffff, blocks } => self.write_data(base, &blocks[..CS as usize]),
            ClusterData::Data { mask, blocks } => {
                let mut next = 0usize;
                let mut b = 0u64;
                while b < 16 {
                    let set = mask & (1 << b) != 0;
                    let mut e = b + 1;
                    while e < 16 && (mask & (1 << e) != 0) == set {
                        e += 1;
                    }
                    let n = (e - b) as usize;
                    if set {
                        let bytes = &blocks[next * BLOCK as usize..(next + n) * BLOCK as usize];
                        self.write_data(base + b * BLOCK, bytes)?;
                        next += n;
                    } else {
                        self.zero(base + b * BLOCK, (e - b) * BLOCK)?;
                    }
                    b = e;
                }
                Ok(())
            }
        }
    }

    /// Flush everything to stable storage and close the target.
    pub fn finish(mut self) -> Result<()> {
        self.flush_zeros()?;
        let path = self.path.clone();
        match &mut self.kind {
            Kind::Direct { .. } if self.cache == Cache::Unsafe => Ok(()),
            Kind::Direct { file, .. } => {
                file.sync_all().with_context(|| format!("flushing {path}"))
            }
            Kind::Nbd {
                client,
                daemon,
                dir,
            } => {
                let c = client.take().expect("open");
                if self.cache != Cache::Unsafe {
                    c.flush().with_context(|| format!("flushing {path}"))?;
                }
                c.disconnect();
                stop_daemon(daemon, dir)
            }
            Kind::Stdout {
                out, next, pending, ..
            } => {
                if !pending.is_empty() || *next != self.size {
                    bail!(
                        "drive {}: only {} of {} bytes reached standard output",
                        self.drive,
                        *next,
                        self.size
                    );
                }
                out.flush().context("writing standard output")
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Kind::Nbd { daemon, dir, .. } = &mut self.kind {
            let _ = stop_daemon(daemon, dir);
        }
    }
}

/// A target of the wrong size.
#[derive(Debug, thiserror::Error)]
#[error("target {path} of drive {drive} has {target} bytes, the drive {drive_size}: the target must be at least as large as the drive (it is never truncated or grown)")]
pub struct SizeMismatch {
    /// The drive.
    pub drive: String,
    /// The target.
    pub path: String,
    /// The target's size.
    pub target: u64,
    /// The drive's size.
    pub drive_size: u64,
}

fn zero_out(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if r == 0 {
        return Ok(());
    }
    write_zeros(file, offset, len)
}

fn write_zeros(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; (1 << 20).min(len) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Escape a value for QEMU's `key=value,...` option syntax.
fn qemu_opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// Export `path` (in `format`) read-write over NBD with
/// `qemu-storage-daemon` and connect to it.
fn start_nbd(path: &Path, format: &str, block_device: bool, cache: Cache) -> Result<Kind> {
    if !format
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("unknown image format {format:?}");
    }
    let dir = std::env::temp_dir().join(format!(".vma-target-{}-{}", std::process::id(), {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sock = dir.join("nbd.sock");
    let abs = std::fs::canonicalize(path)?;
    let proto = if block_device { "host_device" } else { "file" };
    let (direct, no_flush, writethrough) = cache.qemu_options();
    let onoff = |b: bool| if b { "on" } else { "off" };
    let mut daemon = Command::new("qemu-storage-daemon");
    daemon
        .arg("--blockdev")
        .arg(format!(
            "driver={proto},filename={},node-name=proto0,discard=unmap,cache.direct={},cache.no-flush={}",
            qemu_opt(&abs.to_string_lossy()),
            onoff(direct),
            onoff(no_flush)
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver={format},file=proto0,node-name=fmt0,discard=unmap,cache.direct={},cache.no-flush={}",
            onoff(direct),
            onoff(no_flush)
        ))
        .arg("--nbd-server")
        .arg(format!(
            "addr.type=unix,addr.path={}",
            qemu_opt(&sock.to_string_lossy())
        ))
        .arg("--export")
        .arg(format!(
            "type=nbd,id=exp0,node-name=fmt0,name=target,writable=on,writethrough={}",
            onoff(writethrough)
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec: the
    // daemon gets the signals our signal thread blocks, and dies with us.
    unsafe {
        daemon.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut daemon = match daemon.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(anyhow!(
                "starting qemu-storage-daemon ({e}); {format} targets are written through it: install QEMU's storage daemon (Debian: qemu-system-common; Proxmox VE: pve-qemu-kvm)"
            ));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = daemon.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = daemon.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let _ = std::fs::remove_dir_all(&dir);
            bail!(
                "qemu-storage-daemon exited ({status}): {}",
                err.trim().replace('\n', "; ")
            );
        }
        if sock.exists() {
            if let Ok(client) = vma_nbd::client::NbdClient::connect_unix(&sock, "target") {
                if client.read_only() {
                    bail!("the NBD export of {} is read-only", path.display());
                }
                return Ok(Kind::Nbd {
                    client: Some(client),
                    daemon,
                    dir,
                });
            }
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            let _ = std::fs::remove_dir_all(&dir);
            bail!("qemu-storage-daemon did not open its NBD socket within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stop `qemu-storage-daemon` cleanly (SIGTERM: it closes its images,
/// writing qcow2 metadata) and remove its socket directory.
fn stop_daemon(daemon: &mut Child, dir: &Path) -> Result<()> {
    if daemon.try_wait()?.is_none() {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = daemon.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            let _ = std::fs::remove_dir_all(dir);
            bail!("qemu-storage-daemon did not stop within 60 s of SIGTERM; it was killed, so the image may lack its last metadata updates: check it with `qemu-img check`");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = std::fs::remove_dir_all(dir);
    if !status.success() && status.code().is_some() {
        bail!("qemu-storage-daemon exited with {status}");
    }
    Ok(())
}

/// Counts of a restore pass, in Proxmox's terms.
#[derive(Default, Clone, Debug)]
pub struct Counts {
    /// Cluster entries read (every drive).
    pub clusters: u64,
    /// Zero 4 KiB blocks within the drives' ends.
    pub zero_bytes: u64,
    /// Zero bytes inside clusters that also hold data.
    pub partial_zero_bytes: u64,
}

/// The result of [`restore`].
pub struct Restored {
    /// What the pass found (clean unless the error is returned).
    pub counts: Counts,
}

/// A restore failed; `missing` is set when a selected drive lacks a
/// cluster (drive name, first missing cluster).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RestoreError {
    /// What went wrong.
    pub message: String,
    /// First missing cluster of a selected drive.
    pub missing: Option<(String, u64)>,
    /// The underlying error is archive damage.
    pub damage: bool,
}

/// Restore the drives of `stream` that have a target in `targets`
/// (indexed by drive id): one pass, every cluster to its target, then
/// every target flushed. Drives without a target are read and checked
/// but not written; with `check_all` a cluster missing from any of them
/// fails too. `tick` sees the counts after each extent.
pub fn restore<R: Read>(
    stream: ArchiveStream<R>,
    targets: &mut [Option<Target>],
    threads: usize,
    check_all: bool,
    mut tick: impl FnMut(&Counts),
) -> Result<Restored> {
    let header: Header = stream.header().clone();
    vma_core::ops::extract::refuse_incremental(&header)?;
    let mut counts = Counts::default();
    let sizes: HashMap<DriveId, u64> = header.drives.iter().map(|d| (d.id, d.size)).collect();
    let options = PassOptions {
        threads,
        ..Default::default()
    };
    let mut target_error: Option<anyhow::Error> = None;
    // A target's error stops the pass; it is kept here and returned as is.
    let mut stop = |e: anyhow::Error| {
        target_error = Some(e);
        vma_core::Error::Invalid("writing a restore target failed".into())
    };
    let result = stream.pass(&options, |ext: &Arc<DecodedExtent>| {
        for e in &ext.entries {
            counts.clusters += u64::from(e.count);
            let size = sizes.get(&e.drive).copied().unwrap_or(0);
            match e.kind {
                RunKind::Zero => {
                    let start = e.start * CS;
                    let end = ((e.start + u64::from(e.count)) * CS).min(size);
                    counts.zero_bytes += end.saturating_sub(start).div_ceil(BLOCK) * BLOCK;
                    if let Some(t) = targets[e.drive.0 as usize].as_mut() {
                        t.zero(start, end.saturating_sub(start))
                            .map_err(&mut stop)?;
                    }
                }
                RunKind::Unchanged => {
                    if let Some(t) = targets[e.drive.0 as usize].as_mut() {
                        t.cluster(e.start, &ClusterData::Unchanged)
                            .map_err(&mut stop)?;
                    }
                }
                RunKind::Data => {}
            }
        }
        for (drive, cluster, data) in ext.data_clusters() {
            let size = sizes.get(&drive).copied().unwrap_or(0);
            if let ClusterData::Data { mask, .. } = data {
                let base = cluster.0 * CS;
                let blocks_in = (size.saturating_sub(base)).min(CS).div_ceil(BLOCK);
                let zeros = (0..blocks_in).filter(|b| mask & (1 << b) == 0).count() as u64 * BLOCK;
                counts.zero_bytes += zeros;
                if mask != 0 {
                    counts.partial_zero_bytes += zeros;
                }
            }
            if let Some(t) = targets[drive.0 as usize].as_mut() {
                t.cluster(cluster.0, &data).map_err(&mut stop)?;
            }
        }
        tick(&counts);
        Ok(())
    });
    if let Some(e) = target_error {
        return Err(e);
    }
    if let Err(e) = result {
        if let vma_core::Error::Incomplete { ranges, .. } = &e {
            let mine = ranges
                .iter()
                .filter(|r| check_all || targets[r.drive.0 as usize].is_some())
                .min_by_key(|r| (r.drive.0, r.bytes.start));
            match mine {
                None => {} // only drives not restored are incomplete
                Some(r) => {
                    return Err(RestoreError {
                        message: e.to_string(),
                        missing: Some((r.drive_name.clone(), r.bytes.start / CS)),
                        damage: true,
                    }
                    .into())
                }
            }
        } else {
            let damage = e.is_damage();
            return Err(RestoreError {
                message: e.to_string(),
                missing: None,
                damage,
            }
            .into());
        }
    }
    for t in targets.iter_mut() {
        if let Some(t) = t.take() {
            t.finish()?;
        }
    }
    Ok(Restored { counts })
}

/// `vma extract ARCHIVE --drive NAME --to PATH|-`: each named drive (in
/// order) into the target given at the same position. With one drive in
/// the archive, `--drive` may be left out.
pub fn extract_to(
    archive: &str,
    drives: &[String],
    tos: &[String],
    target_zeroed: bool,
    no_space_check: bool,
    threads: usize,
    quiet: bool,
) -> Result<()> {
    let (stream, path, compression) = crate::open_stream(archive)?;
    let header = stream.header().clone();
    let names: Vec<String> = if drives.is_empty() && header.drives.len() == 1 && tos.len() == 1 {
        vec![header.drives[0].name.clone()]
    } else {
        drives.to_vec()
    };
    if names.len() != tos.len() {
        bail!(
            "{} --drive and {} --to given: name one drive per target, in the same order (--drive A --to PATH_A --drive B --to PATH_B)",
            names.len(),
            tos.len()
        );
    }
    if tos.iter().filter(|t| *t == "-").count() > 1 {
        bail!("only one drive can go to standard output");
    }
    // Data bytes per drive, for the free-space check, where the archive's
    // index is at hand (a native archive file).
    let records = match (&path, compression, stream.format().is_native()) {
        (Some(p), vma_core::read::detect::StreamCompression::None, true) => {
            vma_core::Reader::open(p)
                .ok()
                .map(|r| r.drive_records().to_vec())
        }
        _ => None,
    };
    // VMA v1: the drive's size bounds its data (or the archive's size).
    let v1_len = (!stream.format().is_native())
        .then(|| crate::space::archive_len(path.as_deref(), compression));
    let mut targets: Vec<Option<Target>> = (0..=255).map(|_| None).collect();
    let mut groups = Groups::default();
    for (name, to) in names.iter().zip(tos) {
        let Some(d) = header.drives.iter().find(|d| d.name == *name) else {
            let all: Vec<&str> = header.drives.iter().map(|d| d.name.as_str()).collect();
            bail!(
                "the archive has no drive {name:?}; its drives: {}",
                all.join(", ")
            );
        };
        if targets[d.id.0 as usize].is_some() {
            bail!("drive {name} is named twice");
        }
        let mut spec = TargetSpec::new(to);
        if let Some(rest) = to.strip_prefix("format=") {
            // format=F:PATH, as for create's sources.
            let (f, p) = rest
                .split_once(':')
                .ok_or_else(|| anyhow!("--to {to}: expected format=FORMAT:PATH"))?;
            spec.format = Some(f.to_owned());
            spec.path = p.to_owned();
        }
        if target_zeroed {
            spec.zeros = Zeros::Skip;
        }
        spec.space_check = !no_space_check;
        // A v1 stream or compressed file bounds the data only by the drive's
        // size, which says nothing of a thin disk: no refusal then.
        let data = match v1_len {
            Some(len) => len.map(|len| crate::space::v1_bound(d.size, Some(len))),
            None => records.as_ref().and_then(|rs| {
                rs.iter()
                    .find(|r| r.drive == d.id)
                    .map(|r| r.data_clusters * CS)
            }),
        };
        targets[d.id.0 as usize] = Some(Target::open(&spec, &d.name, d.size, data, &mut groups)?);
    }
    // Progress over the stream's logical bytes (every drive's clusters,
    // the drives not restored included: the stream holds them all).
    let total: u64 = header.drives.iter().map(|d| d.size.div_ceil(CS) * CS).sum();
    let progress = crate::output::Progress::bytes(total, "extract", quiet);
    let start = Instant::now();
    let restored = restore(stream, &mut targets, threads, false, |c| {
        progress.set(c.clusters * CS)
    })?;
    progress.finish();
    if !quiet {
        eprintln!(
            "vma: restored {} drive(s) in {:.1} s ({} cluster entries read)",
            names.len(),
            start.elapsed().as_secs_f64(),
            restored.counts.clusters
        );
    }
    Ok(())
}

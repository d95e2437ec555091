//! A read-only FUSE view of a vma archive: one file per drive
//! (`<drive>.raw`, its exact size), one per config blob, and any extra
//! files the caller adds (the CLI adds `archive.json`).
//!
//! Reads go through [`vma_core::Reader`]: random access through the index,
//! a bounded cache of decoded extents, zero runs answered without I/O.
//! Requests are served concurrently on a blocking thread pool, holes are
//! reported through SEEK_DATA/SEEK_HOLE, and a read touching a damaged
//! extent fails with EIO (and is logged with the drive and byte range)
//! while every other read goes on working.

use std::ffi::{OsStr, OsString};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fuse3::raw::prelude::*;
use fuse3::{Errno, MountOptions, Result as FuseResult, Timestamp};
use futures_util::stream::{self, Stream};
use vma_core::chain::{Chain, Seek};
use vma_core::{check_name, DriveId, CLUSTER_SIZE};

/// Inode of the root directory.
const ROOT: u64 = 1;
/// How long the kernel may cache attributes and names (they never change).
const TTL: Duration = Duration::from_secs(3600);
/// FOPEN_DIRECT_IO: reads bypass the kernel page cache and reach us at the
/// reader's own size (up to [`MAX_READ`]). Drive files use it: the kernel's
/// readahead for FUSE sends 128 KiB requests one or two at a time, which
/// halves sequential throughput, and caching holes and data we already
/// cache decoded would only double the memory used.
const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// FOPEN_KEEP_CACHE: the kernel keeps cached pages across opens.
const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// Largest read request the kernel sends (FUSE's limit of 256 pages).
const MAX_READ: usize = 1 << 20;
/// What reads that fall entirely in a hole are answered with, without copying.
static ZEROS: [u8; MAX_READ] = [0; MAX_READ];
/// Read buffers kept for reuse (fresh 1 MiB buffers cost a page fault per 4 KiB).
const POOLED_BUFFERS: usize = 16;

/// How far past a sequential read extents are decoded ahead of time.
const PREFETCH_BYTES: u64 = 8 << 20;
/// Reads that start within this distance of where the previous read of the
/// same file ended count as sequential (readahead requests arrive unordered).
const SEQUENTIAL_SLACK: u64 = 4 << 20;
/// Threads decoding extents ahead of sequential readers.
const PREFETCH_THREADS: usize = 2;

/// Where a message about a failed read goes.
pub type Logger = Arc<dyn Fn(&str) + Send + Sync>;

/// What a file of the mount holds.
#[derive(Clone)]
enum Content {
    /// A drive of the archive.
    Drive {
        id: DriveId,
        size: u64,
        stored: u64,
        /// Where the latest read ended (for detecting sequential reading
        /// and for prefetching ahead of it).
        last_end: Arc<AtomicU64>,
    },
    /// Bytes held in memory (config blobs, archive.json).
    Bytes(Arc<Vec<u8>>),
}

/// One file in the root directory.
#[derive(Clone)]
struct Node {
    name: String,
    content: Content,
}

impl Node {
    fn size(&self) -> u64 {
        match &self.content {
            Content::Drive { size, .. } => *size,
            Content::Bytes(b) => b.len() as u64,
        }
    }
}

/// The mounted file system.
pub struct ArchiveFs {
    /// The archive (with its ancestors, when incremental).
    chain: Arc<Chain>,
    /// Files; file i has inode i + 2.
    nodes: Vec<Node>,
    time: Timestamp,
    uid: u32,
    gid: u32,
    log: Logger,
    /// Requests for the prefetch threads (see [`start_prefetchers`]).
    prefetch_queue: crossbeam_channel::Sender<(DriveId, Arc<AtomicU64>)>,
    /// Read buffers for reuse.
    buffers: BufferPool,
    /// Answer damaged data with zeros (logged) instead of EIO.
    salvage: bool,
}

type BufferPool = Arc<Mutex<Vec<Vec<u8>>>>;

/// A read buffer that goes back to its pool once the reply is sent.
struct PooledBuffer {
    bytes: Vec<u8>,
    pool: BufferPool,
}

impl PooledBuffer {
    /// A buffer of `len` bytes (contents unspecified: the reader overwrites them).
    fn take(pool: &BufferPool, len: usize) -> PooledBuffer {
        let mut bytes = pool.lock().expect("buffer pool").pop().unwrap_or_default();
        bytes.resize(len, 0);
        PooledBuffer {
            bytes,
            pool: pool.clone(),
        }
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().expect("buffer pool");
        if pool.len() < POOLED_BUFFERS {
            pool.push(std::mem::take(&mut self.bytes));
        }
    }
}

/// Errors found before mounting (bad names, name clashes).
#[derive(Debug)]
pub struct LayoutError(pub String);

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayoutError {}

impl ArchiveFs {
    /// The view of `chain` (an archive, with its ancestors when it is
    /// incremental), plus `extra` files (name, bytes) such as
    /// `archive.json`. Refuses names that are unsafe or clash.
    /// Failed reads are logged to stderr until [`ArchiveFs::set_logger`].
    pub fn new(chain: Chain, extra: Vec<(String, Vec<u8>)>) -> Result<ArchiveFs, LayoutError> {
        let reader = chain.newest();
        let header = reader.header();
        let mut nodes = Vec::new();
        for (i, d) in header.drives.iter().enumerate() {
            nodes.push(Node {
                name: format!("{}.raw", d.name),
                content: Content::Drive {
                    id: d.id,
                    size: d.size,
                    stored: reader.drive_records().get(i).map_or(0, |r| r.stored_bytes),
                    last_end: Arc::new(AtomicU64::new(u64::MAX)),
                },
            });
        }
        // The configs of the point in time: stored in the archive, or
        // those of the nearest ancestor that stores them.
        for c in chain.point_configs().blobs() {
            nodes.push(Node {
                name: c.name,
                content: Content::Bytes(Arc::new(c.data)),
            });
        }
        for (name, bytes) in extra {
            nodes.push(Node {
                name,
                content: Content::Bytes(Arc::new(bytes)),
            });
        }
        let mut names: Vec<&str> = Vec::new();
        for n in &nodes {
            check_name(&n.name).map_err(|e| LayoutError(e.to_string()))?;
            if names.contains(&n.name.as_str()) {
                return Err(LayoutError(format!(
                    "two archive members would both appear as {:?} in the mount",
                    n.name
                )));
            }
            names.push(&n.name);
        }
        let time = Timestamp::new(header.ctime, 0);
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let chain = Arc::new(chain);
        Ok(ArchiveFs {
            prefetch_queue: start_prefetchers(&chain),
            chain,
            nodes,
            time,
            uid,
            gid,
            log: Arc::new(|msg: &str| eprintln!("vma mount: {msg}")),
            buffers: Arc::default(),
            salvage: false,
        })
    }

    /// Salvage mode: a read touching damaged data (an ancestor's extent
    /// that fails its checks, say) returns zeros for the clusters that
    /// cannot be read, logging each, instead of failing with EIO.
    pub fn set_salvage(&mut self, salvage: bool) {
        self.salvage = salvage;
    }

    /// Where messages about failed reads go.
    pub fn set_logger(&mut self, log: Logger) {
        self.log = log;
    }

    /// Ask the prefetch threads to decode ahead of a sequential reader of
    /// drive `id` now at `reading_at`.
    fn prefetch(&self, id: DriveId, reading_at: &Arc<AtomicU64>) {
        // Full queue: every thread is busy ahead of some reader already.
        let _ = self.prefetch_queue.try_send((id, reading_at.clone()));
    }

    /// [`Chain::seek`] on a blocking thread: it may read index pages (from
    /// an object store, a ranged GET) and must not block the file system's
    /// async workers.
    async fn seek_blocking(
        &self,
        id: DriveId,
        offset: u64,
        what: Seek,
    ) -> vma_core::Result<Option<u64>> {
        let chain = self.chain.clone();
        tokio::task::spawn_blocking(move || chain.seek(id, offset, what))
            .await
            .map_err(|e| vma_core::Error::Invalid(format!("seeking: {e}")))?
    }

    fn node(&self, inode: u64) -> Option<&Node> {
        inode
            .checked_sub(2)
            .and_then(|i| self.nodes.get(i as usize))
    }

    fn attr(&self, inode: u64) -> Option<FileAttr> {
        let (kind, perm, size, blocks, nlink) = if inode == ROOT {
            (FileType::Directory, 0o555, 0, 0, 2)
        } else {
            let node = self.node(inode)?;
            let blocks = match &node.content {
                Content::Drive { stored, .. } => stored.div_ceil(512),
                Content::Bytes(b) => (b.len() as u64).div_ceil(512),
            };
            (FileType::RegularFile, 0o444, node.size(), blocks, 1)
        };
        Some(FileAttr {
            ino: inode,
            size,
            blocks,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: CLUSTER_SIZE as u32,
        })
    }

    /// Every entry of the root directory, `.` and `..` first.
    fn entries(&self) -> Vec<(u64, FileType, OsString)> {
        let mut out = vec![
            (ROOT, FileType::Directory, OsString::from(".")),
            (ROOT, FileType::Directory, OsString::from("..")),
        ];
        for (i, n) in self.nodes.iter().enumerate() {
            out.push((i as u64 + 2, FileType::RegularFile, OsString::from(&n.name)));
        }
        out
    }
}

/// Start [`PREFETCH_THREADS`] threads that keep the extents of the
/// [`PREFETCH_BYTES`] ahead of a sequential reader decoded and cached: given
/// a drive and where its reader is, a thread decodes the nearest extent in
/// that window not yet cached, then the next, until the window is full, so
/// the reader finds its data ready while the other core serves it. The
/// threads end when the file system is dropped. Damage found here is not
/// logged (the read that needs the extent reports it) and ends that request.
fn start_prefetchers(chain: &Arc<Chain>) -> crossbeam_channel::Sender<(DriveId, Arc<AtomicU64>)> {
    let (tx, rx) = crossbeam_channel::bounded::<(DriveId, Arc<AtomicU64>)>(PREFETCH_THREADS);
    for n in 0..PREFETCH_THREADS {
        let chain = chain.clone();
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vma-prefetch-{n}"))
            .spawn(move || {
                for (id, reading_at) in rx {
                    loop {
                        let at = reading_at.load(Ordering::Relaxed);
                        let window = at..at.saturating_add(PREFETCH_BYTES);
                        let reader = chain.newest();
                        let Some(&key) = reader.extents_to_prefetch(id, window).first() else {
                            break;
                        };
                        if reader.extent(key).is_err() {
                            break;
                        }
                    }
                }
            });
        // Without prefetch threads reads still work, only slower.
        drop(spawned);
    }
    tx
}

impl Filesystem for ArchiveFs {
    async fn init(&self, _req: Request) -> FuseResult<ReplyInit> {
        let mut reply = ReplyInit::new(NonZeroU32::new(MAX_READ as u32).expect("non-zero"));
        reply.max_background = Some(64);
        Ok(reply)
    }

    async fn destroy(&self, _req: Request) {}

    async fn lookup(&self, _req: Request, parent: u64, name: &OsStr) -> FuseResult<ReplyEntry> {
        if parent != ROOT {
            return Err(Errno::new_not_exist());
        }
        let i = self
            .nodes
            .iter()
            .position(|n| OsStr::new(&n.name) == name)
            .ok_or_else(Errno::new_not_exist)?;
        Ok(ReplyEntry {
            ttl: TTL,
            attr: self.attr(i as u64 + 2).expect("node exists"),
            generation: 0,
        })
    }

    async fn getattr(
        &self,
        _req: Request,
        inode: u64,
        _fh: Option<u64>,
        _flags: u32,
    ) -> FuseResult<ReplyAttr> {
        let attr = self.attr(inode).ok_or_else(Errno::new_not_exist)?;
        Ok(ReplyAttr { ttl: TTL, attr })
    }

    async fn open(&self, _req: Request, inode: u64, flags: u32) -> FuseResult<ReplyOpen> {
        let node = self.node(inode).ok_or_else(Errno::new_not_exist)?;
        if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(libc::EROFS.into());
        }
        Ok(ReplyOpen {
            fh: 0,
            flags: match node.content {
                Content::Drive { .. } => FOPEN_DIRECT_IO,
                Content::Bytes(_) => FOPEN_KEEP_CACHE,
            },
        })
    }

    async fn read(
        &self,
        _req: Request,
        inode: u64,
        _fh: u64,
        offset: u64,
        size: u32,
    ) -> FuseResult<ReplyData> {
        let node = self.node(inode).ok_or_else(Errno::new_not_exist)?;
        let end = (offset.saturating_add(size as u64)).min(node.size());
        if offset >= end {
            return Ok(ReplyData { data: Bytes::new() });
        }
        match &node.content {
            Content::Bytes(b) => Ok(ReplyData {
                data: Bytes::copy_from_slice(&b[offset as usize..end as usize]),
            }),
            Content::Drive { id, last_end, .. } => {
                let hole = self
                    .seek_blocking(*id, offset, Seek::Data)
                    .await
                    .map_err(|_| Errno::from(libc::EIO))?
                    .is_none_or(|data| data >= end);
                if hole && end - offset <= MAX_READ as u64 {
                    return Ok(ReplyData {
                        data: Bytes::from_static(&ZEROS[..(end - offset) as usize]),
                    });
                }
                let previous_end = last_end.swap(end, Ordering::Relaxed);
                if previous_end.abs_diff(offset) <= SEQUENTIAL_SLACK {
                    self.prefetch(*id, last_end);
                }
                let chain = self.chain.clone();
                let id = *id;
                let len = (end - offset) as usize;
                let mut buf = PooledBuffer::take(&self.buffers, len);
                let (salvage, log, name) = (self.salvage, self.log.clone(), node.name.clone());
                let result = tokio::task::spawn_blocking(move || {
                    if !salvage {
                        return chain.read_at(id, offset, &mut buf.bytes).map(|()| buf);
                    }
                    for lost in chain.read_salvaging(id, offset, &mut buf.bytes)? {
                        let (start, end) = (lost.bytes.start, lost.bytes.end);
                        log(&format!(
                            "{name}: bytes {start}..{end} read as zeros (salvage): {}",
                            lost.error
                        ));
                    }
                    Ok(buf)
                })
                .await
                .map_err(|_| Errno::from(libc::EIO))?;
                match result {
                    Ok(buf) => Ok(ReplyData {
                        data: Bytes::from_owner(buf),
                    }),
                    Err(e) => {
                        (self.log)(&format!(
                            "read of {} bytes {offset}..{end} failed with EIO: {e}",
                            node.name
                        ));
                        Err(libc::EIO.into())
                    }
                }
            }
        }
    }

    async fn statfs(&self, _req: Request, _inode: u64) -> FuseResult<ReplyStatFs> {
        let size = std::fs::metadata(self.chain.newest().path()).map_or(0, |m| m.len());
        Ok(ReplyStatFs {
            blocks: size.div_ceil(4096),
            bfree: 0,
            bavail: 0,
            files: self.nodes.len() as u64 + 1,
            ffree: 0,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }

    async fn release(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        _flags: u32,
        _lock_owner: u64,
        _flush: bool,
    ) -> FuseResult<()> {
        Ok(())
    }

    async fn flush(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        _lock_owner: u64,
    ) -> FuseResult<()> {
        Ok(())
    }

    async fn opendir(&self, _req: Request, inode: u64, _flags: u32) -> FuseResult<ReplyOpen> {
        if inode != ROOT {
            return Err(Errno::new_is_not_dir());
        }
        Ok(ReplyOpen { fh: 0, flags: 0 })
    }

    async fn readdir<'a>(
        &'a self,
        _req: Request,
        parent: u64,
        _fh: u64,
        offset: i64,
    ) -> FuseResult<ReplyDirectory<impl Stream<Item = FuseResult<DirectoryEntry>> + Send + 'a>>
    {
        if parent != ROOT {
            return Err(Errno::new_is_not_dir());
        }
        let entries: Vec<FuseResult<DirectoryEntry>> = self
            .entries()
            .into_iter()
            .enumerate()
            .skip(offset.max(0) as usize)
            .map(|(i, (inode, kind, name))| {
                Ok(DirectoryEntry {
                    inode,
                    kind,
                    name,
                    offset: i as i64 + 1,
                })
            })
            .collect();
        Ok(ReplyDirectory {
            entries: stream::iter(entries),
        })
    }

    async fn readdirplus<'a>(
        &'a self,
        _req: Request,
        parent: u64,
        _fh: u64,
        offset: u64,
        _lock_owner: u64,
    ) -> FuseResult<
        ReplyDirectoryPlus<impl Stream<Item = FuseResult<DirectoryEntryPlus>> + Send + 'a>,
    > {
        if parent != ROOT {
            return Err(Errno::new_is_not_dir());
        }
        let entries: Vec<FuseResult<DirectoryEntryPlus>> = self
            .entries()
            .into_iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, (inode, kind, name))| {
                Ok(DirectoryEntryPlus {
                    inode,
                    generation: 0,
                    kind,
                    name,
                    offset: i as i64 + 1,
                    attr: self.attr(inode).expect("listed inode"),
                    entry_ttl: TTL,
                    attr_ttl: TTL,
                })
            })
            .collect();
        Ok(ReplyDirectoryPlus {
            entries: stream::iter(entries),
        })
    }

    async fn access(&self, _req: Request, inode: u64, mask: u32) -> FuseResult<()> {
        if self.attr(inode).is_none() {
            return Err(Errno::new_not_exist());
        }
        if mask as i32 & libc::W_OK != 0 {
            return Err(libc::EROFS.into());
        }
        Ok(())
    }

    async fn lseek(
        &self,
        _req: Request,
        inode: u64,
        _fh: u64,
        offset: u64,
        whence: u32,
    ) -> FuseResult<ReplyLSeek> {
        let node = self.node(inode).ok_or_else(Errno::new_not_exist)?;
        let what = match whence as i32 {
            libc::SEEK_DATA => Seek::Data,
            libc::SEEK_HOLE => Seek::Hole,
            _ => return Err(libc::EINVAL.into()),
        };
        let size = node.size();
        let found = match &node.content {
            Content::Drive { id, .. } => {
                self.seek_blocking(*id, offset, what).await.map_err(|e| {
                    (self.log)(&format!("{}: seeking from {offset}: {e}", node.name));
                    Errno::from(libc::EIO)
                })?
            }
            Content::Bytes(_) if offset >= size => None,
            Content::Bytes(_) => Some(match what {
                Seek::Data => offset,
                Seek::Hole => size,
            }),
        };
        found
            .map(|offset| ReplyLSeek { offset })
            .ok_or_else(|| libc::ENXIO.into())
    }
}

/// How to mount.
#[derive(Clone, Debug, Default)]
pub struct MountConfig {
    /// Let other users see the mount (needs `user_allow_other` for non-root).
    pub allow_other: bool,
    /// Mount through the setuid helper `fusermount3` (from the `fuse3`
    /// package) instead of the `mount` system call, as a user who is not
    /// root must; it is then also unmounted through it.
    pub unprivileged: bool,
}

/// Mount `fs` at `mountpoint` and serve it until it is unmounted (by
/// `umount`/`vma umount`) or the process gets SIGINT or SIGTERM (which
/// unmount it). `ready` is called once the mount is in place.
pub fn serve(
    fs: ArchiveFs,
    mountpoint: &Path,
    config: &MountConfig,
    ready: impl FnOnce(),
) -> std::io::Result<()> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(2))
        .max_blocking_threads(threads * 4)
        .thread_name("vma-fuse")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut options = MountOptions::default();
        options
            .fs_name("vma")
            .read_only(true)
            .allow_other(config.allow_other)
            .custom_options(format!("subtype=vma,max_read={MAX_READ}"));
        let session = Session::new(options);
        let mut handle = if config.unprivileged {
            session.mount_with_unprivileged(fs, mountpoint).await?
        } else {
            session.mount(fs, mountpoint).await?
        };
        ready();
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        tokio::select! {
            result = &mut handle => result,
            _ = terminate.recv() => handle.unmount().await,
            _ = interrupt.recv() => handle.unmount().await,
        }
    })
}

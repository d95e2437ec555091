//! `vma mount` and `vma umount`: flags, detaching, and where the mount's
//! messages go. The file system itself is `vma-fuse`.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use vma_core::chain::Chain;
use vma_core::read::damage::DamageReport;
use vma_core::read::detect::StreamCompression;
use vma_core::Reader;
use vma_fuse::{serve, ArchiveFs, Logger, MountConfig};

use crate::output::list_json;
use crate::Opened;

/// Arguments of `vma mount`.
#[derive(clap::Args, Clone)]
pub(crate) struct MountArgs {
    /// Archive file (native, or uncompressed Proxmox VMA v1).
    pub(crate) archive: PathBuf,
    /// Empty directory to mount on.
    pub(crate) mountpoint: PathBuf,
    /// Stay in the foreground (messages on stderr; Ctrl-C unmounts).
    #[arg(long)]
    foreground: bool,
    /// Let other users see the files (FUSE `allow_other`).
    #[arg(long)]
    allow_other: bool,
    /// An ancestor of an incremental archive (repeatable); by default they
    /// are looked for beside the archive, by uuid.
    #[arg(long = "parent", value_name = "PATH")]
    parents: Vec<PathBuf>,
    /// MiB of decoded extents to keep in memory.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    cache_size: usize,
    /// Append messages (failed reads) to this file; detached mounts log to
    /// syslog without it.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Mount a damaged or truncated archive: one pass first checks every
    /// extent and rebuilds the index from the intact ones; what is lost
    /// reads as zeros, is listed (and shown as `salvage.json` in the
    /// mount), and the command exits 1.
    #[arg(long)]
    pub(crate) salvage: bool,
    /// With `--salvage`: print the report of lost ranges as JSON.
    #[arg(long, requires = "salvage")]
    json: bool,
    /// Internal: run as the detached serving process, reporting readiness
    /// on standard output.
    #[arg(long, hide = true)]
    daemon_child: bool,
}

/// `vma mount`: check everything, then serve in the foreground or in a
/// detached process; returns once the mount is ready.
pub(crate) fn mount(args: &MountArgs) -> Result<()> {
    return_large_buffers();
    if args.daemon_child {
        return daemon_child(args);
    }
    crate::mounts::check_mountable(&args.archive)?;
    crate::mounts::preflight(&args.mountpoint, args.allow_other)?;
    if args.foreground {
        let (mut fs, salvage) = prepare(args)?;
        if let Some(report) = &salvage {
            print_salvage(args, report)?;
        }
        fs.set_logger(logger(args.log.as_deref(), true)?);
        let mp = args.mountpoint.display().to_string();
        serve(fs, &args.mountpoint, &config(args), || {
            eprintln!("vma: mounted on {mp}; Ctrl-C or `vma umount {mp}` unmounts")
        })
        .map_err(|e| crate::mounts::explain_mount_error(e, &args.mountpoint))?;
        return salvage_outcome(salvage.as_ref());
    }
    // Check everything here first, so errors reach the terminal; a salvage
    // pass reads the whole archive, so only the serving process does it.
    if !args.salvage {
        drop(prepare(args)?);
    }
    // Re-run ourselves detached; it prints "ready" or an error on stdout.
    let exe = std::env::current_exe().context("finding the vma executable")?;
    let mut cmd = Command::new(exe);
    // The child runs in `/`: hand it absolute paths.
    cmd.arg("mount")
        .arg(absolute(&args.archive)?)
        .arg(absolute(&args.mountpoint)?)
        .arg("--cache-size")
        .arg(args.cache_size.to_string())
        .arg("--daemon-child");
    if args.allow_other {
        cmd.arg("--allow-other");
    }
    if args.salvage {
        cmd.arg("--salvage");
    }
    if let Some(log) = &args.log {
        cmd.arg("--log").arg(absolute(log)?);
    }
    for parent in &args.parents {
        cmd.arg("--parent").arg(absolute(parent)?);
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
    let mut child = cmd.spawn().context("starting the mount process")?;
    let out = child.stdout.take().expect("piped stdout");
    let mut out = BufReader::new(out);
    let mut line = String::new();
    out.read_line(&mut line)
        .context("waiting for the mount process")?;
    let mut salvage = None;
    if let Some(doc) = line.strip_prefix("salvage ") {
        let report: DamageReport =
            serde_json::from_str(doc).context("reading the mount process's salvage report")?;
        line.clear();
        out.read_line(&mut line)
            .context("waiting for the mount process")?;
        salvage = Some(report);
    }
    match line.trim_end() {
        "ready" => {
            if let Some(report) = &salvage {
                print_salvage(args, report)?;
            }
            salvage_outcome(salvage.as_ref())
        }
        "" => {
            let status = child.wait().ok();
            bail!("the mount process ended before the mount was ready ({status:?})")
        }
        msg => {
            let _ = child.wait();
            match msg.strip_prefix("damage: ") {
                Some(damage) => Err(crate::Damage(damage.to_string()).into()),
                None => Err(anyhow!("{}", msg.trim_start_matches("error: "))),
            }
        }
    }
}

/// For a long-running server (mount, serve): buffers of 256 KiB and more
/// (extents, responses) are mapped and unmapped on their own, so freed
/// ones go back to the system. glibc otherwise raises that threshold to
/// the largest buffer freed (up to 32 MiB) and keeps freed memory in each
/// thread's arena: a mount of an S3 archive peaked at 276 MiB instead of
/// 154 MiB for the same reads.
pub(crate) fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's settings.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if crate::s3::is_s3_path(p) {
        return Ok(p.to_path_buf());
    }
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn config(args: &MountArgs) -> MountConfig {
    MountConfig {
        allow_other: args.allow_other,
        unprivileged: crate::mounts::unprivileged(),
    }
}

/// Print a salvage report (JSON with `--json`, else one line per problem
/// and lost range on stderr).
fn print_salvage(args: &MountArgs, report: &DamageReport) -> Result<()> {
    if args.json {
        outln!("{}", serde_json::to_string_pretty(report)?);
    } else {
        crate::output::print_damage_text(report, "read as zeros");
    }
    Ok(())
}

/// Exit 1 (damage) when a salvage report lists problems or lost ranges.
fn salvage_outcome(report: Option<&DamageReport>) -> Result<()> {
    match report {
        Some(r) if !r.ok => Err(crate::Damage(format!(
            "mounted with damage: {} lost range(s) read as zeros",
            r.lost.len()
        ))
        .into()),
        _ => Ok(()),
    }
}

/// Open the archive and build the file system (before mounting, so every
/// error reaches the terminal). With `--salvage`, also the salvage report.
fn prepare(args: &MountArgs) -> Result<(ArchiveFs, Option<DamageReport>)> {
    let meta = std::fs::metadata(&args.mountpoint)
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    if !meta.is_dir() {
        bail!(
            "mount point {} is not a directory",
            args.mountpoint.display()
        );
    }
    let opening = || format!("opening {}", args.archive.display());
    let (newest, salvage) = if args.salvage {
        let (reader, salvage) = Reader::open_salvage(&args.archive, 0).with_context(opening)?;
        (reader, Some(salvage))
    } else {
        (Reader::open(&args.archive).with_context(opening)?, None)
    };
    let opened = Opened {
        header: newest.header().clone(),
        format: newest.format(),
        compression: StreamCompression::None,
        reader: None,
        problem: None,
    };
    let chain = Chain::with_newest(newest, &args.parents).with_context(opening)?;
    // archive.json describes the newest archive, as `vma list --json` does
    // (a salvaged archive: as its intact extents describe it).
    let mut json = serde_json::to_vec_pretty(&list_json(
        &opened,
        Some(chain.newest()),
        &chain.point_configs(),
    ))?;
    json.push(b'\n');
    chain.refuse_interrupted(|_| true)?;
    chain.newest().set_cache_bytes(args.cache_size.max(1) << 20);
    let mut extra = vec![("archive.json".to_string(), json)];
    let report = salvage.as_ref().map(DamageReport::of_salvage);
    if let Some(report) = &report {
        let mut doc = serde_json::to_vec_pretty(report)?;
        doc.push(b'\n');
        extra.push(("salvage.json".to_string(), doc));
    }
    let mut fs = ArchiveFs::new(chain, extra)?;
    fs.set_salvage(args.salvage);
    Ok((fs, report))
}

/// Where failed reads are reported: a file, stderr (foreground), or syslog.
fn logger(file: Option<&Path>, foreground: bool) -> Result<Logger> {
    if let Some(path) = file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening log file {}", path.display()))?;
        let f = Mutex::new(f);
        return Ok(Arc::new(move |msg: &str| {
            if let Ok(mut f) = f.lock() {
                let _ = writeln!(f, "vma mount: {msg}");
            }
        }));
    }
    if foreground {
        return Ok(Arc::new(|msg: &str| eprintln!("vma mount: {msg}")));
    }
    static IDENT: &[u8] = b"vma-mount\0";
    // SAFETY: IDENT is a static NUL-terminated string, as openlog requires.
    unsafe { libc::openlog(IDENT.as_ptr().cast(), libc::LOG_PID, libc::LOG_DAEMON) };
    Ok(Arc::new(|msg: &str| {
        let c = CString::new(msg.replace('\0', " ")).expect("no NUL left");
        // SAFETY: both strings are NUL-terminated; "%s" takes one string.
        unsafe { libc::syslog(libc::LOG_ERR, c"%s".as_ptr(), c.as_ptr()) };
    }))
}

/// The detached serving process: report readiness or the error on stdout,
/// then let stdout go.
fn daemon_child(args: &MountArgs) -> Result<()> {
    let result = (|| -> Result<()> {
        let (mut fs, salvage) = prepare(args)?;
        if let Some(doc) = &salvage {
            report(&format!("salvage {}", serde_json::to_string(doc)?));
        }
        fs.set_logger(logger(args.log.as_deref(), false)?);
        serve(fs, &args.mountpoint, &config(args), || {
            report("ready");
            release_stdout();
        })
        .map_err(|e| crate::mounts::explain_mount_error(e, &args.mountpoint))?;
        Ok(())
    })();
    if let Err(e) = &result {
        let kind = if crate::is_damage(e) {
            "damage"
        } else {
            "error"
        };
        report(&format!("{kind}: {}", crate::one_line(e)));
    }
    result
}

/// One line to the parent waiting on our stdout.
fn report(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

/// Point stdout at /dev/null so the parent's pipe closes.
fn release_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::unix::io::AsRawFd;
        // SAFETY: dup2 onto our own stdout descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

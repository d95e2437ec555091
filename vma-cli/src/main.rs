//! The `vma` command: create, list, config, verify and extract VM backup archives.
//!
//! Exit codes: 0 success; 1 archive damaged or verification failed; 2 usage or I/O error.

mod output;

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use vma_core::extract::{extract, AtomicFile, ExtractOptions};
use vma_core::format::{check_name, limits};
use vma_core::source::{copy_raw_image, RawImage};
use vma_core::stream::human_bytes;
use vma_core::{
    ArchiveMeta, ArchiveStream, Compression, ConfigBlob, DriveId, DriveInfo, Reader, Writer,
    WriterOptions,
};

use output::Progress;

/// VM backup archives you can trust, open and mount.
#[derive(Parser)]
#[command(name = "vma", version, about, long_about = None)]
struct Cli {
    /// No progress bars and no summaries on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an archive from raw disk images or block devices.
    Create {
        /// Archive to write, or `-` for standard output.
        archive: String,
        /// Disk images as [NAME=]PATH; NAME defaults to the file stem.
        #[arg(required = true, value_name = "[NAME=]IMAGE")]
        images: Vec<String>,
        /// Config blob as [NAME=]FILE; NAME defaults to the file name. Repeatable.
        #[arg(long = "config", value_name = "[NAME=]FILE")]
        configs: Vec<String>,
        /// Extent compression: `zstd`, `zstd:LEVEL` or `none`.
        #[arg(long, default_value = "zstd:1", value_name = "zstd[:LEVEL]|none")]
        compress: String,
        /// Worker threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Replace an existing archive file.
        #[arg(long)]
        force: bool,
    },
    /// Show an archive's drives, configs and identity.
    List {
        /// Archive file, or `-` for standard input.
        archive: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a config blob to standard output.
    Config {
        /// Archive file, or `-` for standard input.
        archive: String,
        /// Config name (default: the first).
        name: Option<String>,
        /// Print the config names instead.
        #[arg(long)]
        list: bool,
    },
    /// Check every structure, digest and cluster of an archive.
    Verify {
        /// Archive file, or `-` for standard input.
        archive: String,
        /// Print a JSON report.
        #[arg(long)]
        json: bool,
        /// Decoder threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Skip the whole-drive SHA-256 (one sequential hash of every logical
        /// byte, zeros included); every extent digest is still checked.
        #[arg(long)]
        no_drive_digest: bool,
    },
    /// Extract drives as sparse raw files and config blobs into a directory.
    Extract {
        /// Archive file, or `-` for standard input.
        archive: String,
        /// Directory to write into (created if missing).
        target_dir: PathBuf,
        /// Extract only this drive (repeatable).
        #[arg(long = "drive", value_name = "NAME")]
        drives: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        /// Decoder threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

/// Errors whose exit code is decided by the command (1 = damage found).
#[derive(Debug)]
struct DamageFound(String);

impl std::fmt::Display for DamageFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for DamageFound {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let damage = e.downcast_ref::<DamageFound>().is_some()
                || e.chain().any(|c| {
                    c.downcast_ref::<vma_core::Error>()
                        .is_some_and(|v| v.is_damage())
                });
            eprintln!("vma: error: {}", one_line(&e));
            if damage {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

/// The error chain on one line, outermost first.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if parts.last().is_none_or(|p| !p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Create {
            archive,
            images,
            configs,
            compress,
            threads,
            force,
        } => create(
            &archive, &images, &configs, &compress, threads, force, quiet,
        ),
        Command::List { archive, json } => output::list(&archive, json),
        Command::Config {
            archive,
            name,
            list,
        } => config(&archive, name.as_deref(), list),
        Command::Verify {
            archive,
            json,
            threads,
            no_drive_digest,
        } => output::verify(&archive, json, threads, !no_drive_digest, quiet),
        Command::Extract {
            archive,
            target_dir,
            drives,
            force,
            threads,
        } => extract_cmd(&archive, &target_dir, drives, force, threads, quiet),
    }
}

/// Split `[NAME=]PATH`; the name part must be a valid name without `/`.
fn split_named(arg: &str) -> (Option<String>, PathBuf) {
    if let Some((name, path)) = arg.split_once('=') {
        if !name.is_empty() && !name.contains('/') && !Path::new(arg).exists() {
            return (Some(name.to_string()), PathBuf::from(path));
        }
    }
    (None, PathBuf::from(arg))
}

fn parse_compression(s: &str) -> Result<Compression> {
    match s.split_once(':') {
        None if s == "none" => Ok(Compression::None),
        None if s == "zstd" => Ok(Compression::default()),
        Some(("zstd", level)) => {
            let level: i32 = level.parse().map_err(|_| {
                anyhow!("--compress zstd:LEVEL needs a whole number, got {level:?}")
            })?;
            Ok(Compression::Zstd(level))
        }
        _ => bail!("--compress takes zstd, zstd:LEVEL or none, not {s:?}"),
    }
}

/// Open an archive argument: a file, or standard input for `-`.
fn open_input(archive: &str) -> Result<(Box<dyn Read>, Option<PathBuf>)> {
    if archive == "-" {
        Ok((Box::new(std::io::stdin().lock()), None))
    } else {
        let f = File::open(archive).with_context(|| format!("opening {archive}"))?;
        Ok((Box::new(f), Some(PathBuf::from(archive))))
    }
}

/// An archive opened for one sequential pass, and its path unless stdin.
type OpenStream = (ArchiveStream<Box<dyn Read>>, Option<PathBuf>);

fn open_stream(archive: &str) -> Result<OpenStream> {
    let (input, path) = open_input(archive)?;
    let name = if archive == "-" {
        "standard input"
    } else {
        archive
    };
    Ok((ArchiveStream::open(input, name)?, path))
}

fn create(
    archive: &str,
    image_args: &[String],
    config_args: &[String],
    compress: &str,
    threads: usize,
    force: bool,
    quiet: bool,
) -> Result<()> {
    let compression = parse_compression(compress)?;
    if image_args.len() > limits::MAX_DRIVES {
        bail!(
            "{} images given; an archive holds at most {} drives",
            image_args.len(),
            limits::MAX_DRIVES
        );
    }
    let mut images = Vec::new();
    let mut drives = Vec::new();
    for (i, arg) in image_args.iter().enumerate() {
        let (name, path) = split_named(arg);
        let name = match name {
            Some(n) => n,
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    anyhow!("cannot derive a drive name from {arg:?}; use NAME={arg}")
                })?,
        };
        check_name(&name).with_context(|| format!("drive name for {}", path.display()))?;
        let image = RawImage::open(&path)?;
        drives.push(DriveInfo {
            id: DriveId(i as u8 + 1),
            name,
            size: image.size(),
        });
        images.push(image);
    }
    let mut configs = Vec::new();
    for arg in config_args {
        let (name, path) = split_named(arg);
        let name = match name {
            Some(n) => n,
            None => path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    anyhow!("cannot derive a config name from {arg:?}; use NAME={arg}")
                })?,
        };
        check_name(&name).with_context(|| format!("config name for {}", path.display()))?;
        let size = std::fs::metadata(&path)
            .with_context(|| format!("reading config {}", path.display()))?
            .len();
        if size > limits::MAX_CONFIG_SIZE as u64 {
            bail!(
                "config {} is {size} bytes; a config blob holds at most {} (16 MiB)",
                path.display(),
                limits::MAX_CONFIG_SIZE
            );
        }
        let data =
            std::fs::read(&path).with_context(|| format!("reading config {}", path.display()))?;
        configs.push(ConfigBlob { name, data });
    }
    let meta = ArchiveMeta::new(drives.clone(), configs);
    let options = WriterOptions {
        compression,
        threads,
        ..Default::default()
    };
    let total: u64 = drives.iter().map(|d| d.size).sum();
    let progress = Progress::bytes(total, "create", quiet);
    let summary = if archive == "-" {
        let stdout = std::io::stdout().lock();
        let mut writer = Writer::new(BufWriter::with_capacity(1 << 20, stdout), meta, &options)?;
        feed_images(&mut writer, &drives, &images, &progress)?;
        writer.finish()?.1
    } else {
        let dest = Path::new(archive);
        if dest.exists() && !force {
            bail!("{archive} exists; use --force to replace it");
        }
        let out = AtomicFile::create(dest)?;
        let mut writer = Writer::new(BufWriter::with_capacity(1 << 20, out), meta, &options)?;
        feed_images(&mut writer, &drives, &images, &progress)?;
        let (out, s) = writer.finish()?;
        let out = out.into_inner().map_err(|e| e.into_error())?;
        out.commit()?;
        s
    };
    progress.finish();
    if !quiet {
        eprintln!(
            "vma: wrote {} ({} drives, {} logical, {} stored, {} extents)",
            archive,
            drives.len(),
            human_bytes(total),
            human_bytes(summary.bytes_written),
            summary.extents
        );
    }
    Ok(())
}

fn feed_images<W: Write>(
    writer: &mut Writer<W>,
    drives: &[DriveInfo],
    images: &[RawImage],
    progress: &Progress,
) -> Result<()> {
    let mut base = 0;
    for (d, image) in drives.iter().zip(images) {
        copy_raw_image(writer, d.id, image, &mut |done| progress.set(base + done))
            .with_context(|| format!("archiving drive {}", d.name))?;
        base += d.size;
    }
    Ok(())
}

fn config(archive: &str, name: Option<&str>, list: bool) -> Result<()> {
    let (stream, _) = open_stream(archive)?;
    let header = stream.header();
    let mut out = std::io::stdout().lock();
    if list {
        for c in &header.configs {
            writeln!(out, "{}", c.name)?;
        }
        return Ok(());
    }
    let blob = match name {
        Some(n) => header.configs.iter().find(|c| c.name == n).ok_or_else(|| {
            let names: Vec<&str> = header.configs.iter().map(|c| c.name.as_str()).collect();
            anyhow!(
                "the archive has no config named {n:?} (it has: {})",
                names.join(", ")
            )
        })?,
        None => header
            .configs
            .first()
            .ok_or_else(|| anyhow!("the archive holds no config blobs"))?,
    };
    out.write_all(&blob.data)?;
    out.flush()?;
    Ok(())
}

fn extract_cmd(
    archive: &str,
    dir: &Path,
    drives: Vec<String>,
    force: bool,
    threads: usize,
    quiet: bool,
) -> Result<()> {
    let (stream, path) = open_stream(archive)?;
    let total = match &path {
        Some(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        None => 0,
    };
    let progress = Progress::bytes(total, "extract", quiet);
    let options = ExtractOptions {
        drives,
        force,
        threads,
    };
    let summary = extract(stream, dir, &options, |pos| progress.set(pos))?;
    progress.finish();
    if !quiet {
        for f in &summary.files {
            let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            eprintln!("vma: wrote {} ({})", f.display(), human_bytes(size));
        }
    }
    Ok(())
}

/// Used by `output` to open archives for reading.
pub(crate) fn open_reader_or_stream(archive: &str) -> Result<Opened> {
    if archive == "-" {
        let (stream, _) = open_stream(archive)?;
        return Ok(Opened::Stream(Box::new(stream.header().clone()), None));
    }
    match Reader::open(Path::new(archive)) {
        Ok(r) => Ok(Opened::Reader(Box::new(r))),
        Err(e) if e.is_damage() => {
            // Show what the header says and why the rest is unavailable.
            let (stream, _) = open_stream(archive)?;
            Ok(Opened::Stream(
                Box::new(stream.header().clone()),
                Some(e.to_string()),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// An archive opened for listing.
pub(crate) enum Opened {
    /// A complete archive file with its index.
    Reader(Box<Reader>),
    /// Only the header (stdin, or a file whose end is damaged: the reason).
    Stream(Box<vma_core::Header>, Option<String>),
}

pub(crate) use DamageFound as Damage;

/// True when progress bars should be drawn.
pub(crate) fn progress_wanted(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

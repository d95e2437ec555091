//! The `vma` command: create, list, config, verify and extract VM backup archives.
//!
//! Exit codes: 0 success; 1 archive damaged or verification failed; 2 usage or I/O error.

/// `println!` that returns an error instead of panicking when standard
/// output is gone (a closed pipe, a full disk).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("writing standard output: {e}"))?
    }};
}

mod capture;
mod cli_docs;
mod hints;
mod live_restore;
mod mount;
mod mounts;
mod outdir;
mod output;
mod pve;
mod s3;
mod salvage;
mod serve;
mod signals;
mod space;
mod targets;

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use vma_core::chain::{Chain, ChainDrive};
use vma_core::format::limits;
use vma_core::image::args::{named_arg, open_images, split_format, OpenedImages};
use vma_core::image::source::{open_source, DiskImage};
use vma_core::ops::convert::{convert_archive, ConvertOptions};
use vma_core::ops::create::{create_archive, diff_archive, CreateOptions};
use vma_core::ops::extract::{check_member_names, extract, DriveFormat, ExtractOptions};
use vma_core::ops::merge::MergeOptions;
use vma_core::ops::output::ArchiveOutput;
use vma_core::ops::prune::{
    archives_in, execute_prune, files_in, plan_prune, PruneEvent, PruneObserver, PruneOptions,
};
use vma_core::read::detect::{open_any, StreamCompression};
use vma_core::read::stream::ArchiveFormat;
use vma_core::util::human_bytes;
use vma_core::{
    ArchiveMeta, ArchiveStream, Compression, ConfigBlob, DriveInfo, Reader, WriterOptions,
};

use output::Progress;

/// VM backup archives you can trust, open and mount.
#[derive(Parser)]
#[command(name = "vma", version, about, long_about = None)]
struct Cli {
    /// No progress bars and no summaries on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Say more: progress as lines on stderr also when it is not a
    /// terminal (for logs), every tenth of the work.
    #[arg(long, short, global = true, conflicts_with = "quiet")]
    verbose: bool,
    #[command(flatten)]
    s3: s3::S3Args,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an archive from disk images: raw files, block devices, qcow2.
    Create(CreateArgs),
    /// Show an archive's drives, configs and identity.
    List {
        /// Archive file, or `-` for standard input.
        archive: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also list the chain of ancestors of an incremental archive.
        #[arg(long)]
        chain: bool,
        /// An ancestor (repeatable), for `--chain` and for the configs of
        /// an incremental archive that stores none itself; by default they
        /// are looked for beside the archive, by uuid.
        #[arg(long = "parent", value_name = "PATH")]
        parents: Vec<PathBuf>,
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
        /// An ancestor of an incremental archive that stores no VM config
        /// itself (repeatable); by default they are looked for beside the
        /// archive, by uuid.
        #[arg(long = "parent", value_name = "PATH")]
        parents: Vec<PathBuf>,
    },
    /// Check every structure, digest and cluster of an archive.
    Verify {
        /// Archive file, or `-` for standard input.
        archive: String,
        /// Print a JSON report.
        #[arg(long)]
        json: bool,
        /// Decoder threads (default: one per core).
        #[arg(
            long,
            default_value_t = 0,
            hide_default_value = true,
            env = "VMA_THREADS"
        )]
        threads: usize,
        /// 2.0 archives: skip the whole-drive SHA-256 (one sequential hash
        /// of every logical byte, zeros included). 3.0 drive digests are
        /// always checked (one hash per data cluster, on every core).
        #[arg(long)]
        no_drive_digest: bool,
        /// An ancestor of an incremental archive (repeatable); by default
        /// they are looked for beside the archive, by uuid.
        #[arg(long = "parent", value_name = "PATH")]
        parents: Vec<PathBuf>,
    },
    /// Print the drive digest of disk images (raw, qcow2) or of every
    /// drive of archives: the vma tree digest an archive records, so a
    /// restored disk can be compared with its archive.
    Checksum {
        /// Disk images as [format=raw|qcow2:]PATH (the format as `create`
        /// tells it: given, else qcow2 for a file named *.qcow2, else raw),
        /// and archives: a regular file not named as an image (*.raw,
        /// *.img, *.qcow2) that starts like an archive is read as one.
        #[arg(required = true, value_name = "IMAGE|ARCHIVE")]
        paths: Vec<String>,
        #[command(flatten)]
        sources: SourceArgs,
        /// Print the plain SHA-256 of the content instead (what `sha256sum`
        /// of a raw image gives; one sequential hash, zeros included).
        #[arg(long)]
        sha256: bool,
        /// An ancestor of an incremental archive (repeatable); by default
        /// they are looked for beside the archive, by uuid.
        #[arg(long = "parent", value_name = "PATH")]
        parents: Vec<PathBuf>,
        /// Hashing threads (default: one per core).
        #[arg(
            long,
            default_value_t = 0,
            hide_default_value = true,
            env = "VMA_THREADS"
        )]
        threads: usize,
    },
    /// Extract drives (sparse raw or qcow2) and config blobs into a directory.
    Extract {
        /// Archive file, or `-` for standard input.
        archive: String,
        /// Directory to write into (created if missing).
        #[arg(required_unless_present = "to")]
        target_dir: Option<PathBuf>,
        /// Extract only this drive (repeatable).
        #[arg(long = "drive", value_name = "NAME")]
        drives: Vec<String>,
        /// Restore the `--drive` at the same position into this existing
        /// block device, raw or qcow2 image (`format=F:PATH` to say the
        /// format), or `-` for standard output, instead of a directory.
        #[arg(long, value_name = "PATH|-", conflicts_with = "target_dir")]
        to: Vec<String>,
        /// With `--to`: the targets already read as zeros (new, sparse or
        /// pre-zeroed), so zero regions are not touched.
        #[arg(long, requires = "to")]
        target_zeroed: bool,
        /// Skip the free-space check (of `--to` file targets, and of a
        /// directory for a VMA v1 archive, whose header bounds the data
        /// only by the drive sizes).
        #[arg(long)]
        no_space_check: bool,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        /// Decoder threads (default: one per core).
        #[arg(
            long,
            default_value_t = 0,
            hide_default_value = true,
            env = "VMA_THREADS"
        )]
        threads: usize,
        /// Write everything intact even if the archive is damaged or
        /// incomplete; lost ranges become zeros and are reported (exit 1).
        #[arg(long)]
        salvage: bool,
        /// Drive file format: sparse raw, or qcow2 (version 3).
        #[arg(long, value_enum, default_value = "raw")]
        format: ExtractFormat,
        /// With `--format qcow2`: zstd-compress the clusters (QEMU 5.1+ reads them).
        #[arg(long)]
        compress: bool,
        /// An ancestor of an incremental archive (repeatable); by default
        /// they are looked for beside the archive, by uuid.
        #[arg(long = "parent", value_name = "PATH")]
        parents: Vec<PathBuf>,
        /// 2.0 archives: also check each extracted drive's plain SHA-256
        /// (one sequential hash per drive, zeros included). 3.0 drive
        /// digests are always checked, over every byte written.
        #[arg(long)]
        drive_digest: bool,
        /// Print what was written, and what was lost, as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Mount an archive read-only: each drive as a file (FUSE).
    Mount(mount::MountArgs),
    /// Back up drives of a running QEMU over QMP (full or incremental).
    Capture(capture::CaptureArgs),
    /// Serve every drive of an archive (any point of a chain) read-only
    /// over NBD, for QEMU, qemu-img, nbdcopy (one export per drive).
    Serve(serve::ServeArgs),
    /// Copy the drives of a VM running from `vma serve` into their final
    /// storage while it runs, then drop its ties to the archive (QMP).
    LiveRestore(live_restore::LiveRestoreArgs),
    /// Unmount what `vma mount` mounted.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Write the newest point in time of an incremental chain as one
    /// self-contained archive (a synthetic full), streaming from the chain.
    Merge {
        /// The newest archive of the chain.
        archive: PathBuf,
        /// The full archive to write, or `-` for standard output.
        #[arg(short, long, value_name = "FULL")]
        output: String,
        /// An ancestor (repeatable); by default they are looked for beside
        /// the archive, by uuid.
        #[arg(long = "parent", value_name = "PATH")]
        parents: Vec<PathBuf>,
        #[command(flatten)]
        output_options: OutputArgs,
    },
    /// Keep the newest points in time of archive chains and delete the
    /// rest, folding what the kept ones need into a synthetic full.
    Prune {
        /// A directory of archives, or the archives themselves.
        #[arg(required = true, value_name = "DIR|ARCHIVE")]
        paths: Vec<PathBuf>,
        /// How many points in time to keep, newest first.
        #[arg(long, value_name = "N")]
        keep_last: usize,
        /// Print what would be done and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Extent compression of the synthetic fulls: `zstd`, `zstd:LEVEL`
        /// or `none`.
        #[arg(
            long,
            default_value = "zstd:1",
            value_name = "zstd[:LEVEL]|none",
            env = "VMA_COMPRESS"
        )]
        compress: String,
        /// Worker threads (default: one per core).
        #[arg(
            long,
            default_value_t = 0,
            hide_default_value = true,
            env = "VMA_THREADS"
        )]
        threads: usize,
    },
    /// Write an incremental archive of disk images against an earlier
    /// archive (chain): only the clusters that differ are stored.
    Diff {
        /// The archive (the newest of its chain) to compare against; it
        /// becomes the new archive's parent.
        #[arg(long, value_name = "PARENT")]
        against: PathBuf,
        /// Current disk images as [format=raw|qcow2:][NAME=]PATH; NAME
        /// defaults to the file stem and matches a drive of PARENT. Without
        /// a format, a file named *.qcow2 is qcow2, anything else raw.
        #[arg(required = true, value_name = "[format=F:][NAME=]IMAGE")]
        images: Vec<String>,
        #[command(flatten)]
        sources: SourceArgs,
        /// The incremental archive to write, or `-` for standard output.
        #[arg(short, long, value_name = "ARCHIVE")]
        output: String,
        /// An ancestor of PARENT (repeatable); by default they are looked
        /// for beside it, by uuid.
        #[arg(long = "parent", value_name = "PATH")]
        parents: Vec<PathBuf>,
        /// Config blob as [NAME=]FILE (repeatable; default: the VM configs
        /// of PARENT's point in time, carried forward).
        #[arg(long = "config", value_name = "[NAME=]FILE")]
        configs: Vec<String>,
        #[command(flatten)]
        output_options: OutputArgs,
    },
    /// Convert an archive between the native format and Proxmox VMA v1.
    Convert {
        /// Input archive (any format, plain or zstd/gzip/lzop-compressed), or `-`.
        input: String,
        /// Output archive, or `-` for standard output.
        output: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "native")]
        format: OutputFormat,
        /// An ancestor of an incremental input (repeatable); by default
        /// they are looked for beside it, by uuid.
        #[arg(long = "parent", value_name = "PATH")]
        parents: Vec<PathBuf>,
        /// Convert everything intact of a damaged or truncated input; what
        /// is lost is written as zeros and reported (exit 1).
        #[arg(long)]
        salvage: bool,
        #[command(flatten)]
        output_options: OutputArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page vma(1) (roff), made from the command-line
    /// definition; with `--dir`, write it and one page per command there.
    Man {
        /// Write vma.1 and vma-COMMAND.1 into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Options of every command that writes an archive.
#[derive(clap::Args, Debug)]
pub(crate) struct OutputArgs {
    /// Extent compression: `zstd`, `zstd:LEVEL` or `none` (native archives).
    #[arg(
        long,
        default_value = "zstd:1",
        value_name = "zstd[:LEVEL]|none",
        env = "VMA_COMPRESS"
    )]
    compress: String,
    /// Worker threads (default: one per core).
    #[arg(
        long,
        default_value_t = 0,
        hide_default_value = true,
        env = "VMA_THREADS"
    )]
    threads: usize,
    /// Data per extent in KiB, from 4 to 8192 (default 256; native
    /// archives). A random read (vma serve, mount) decodes and checks a
    /// whole extent: 64 makes each one decode a single 64 KiB cluster, as
    /// a compressed qcow2 does, at about 5% larger archives.
    #[arg(long, value_name = "KIB", env = "VMA_EXTENT_SIZE")]
    pub(crate) extent_size: Option<usize>,
    /// Replace an existing archive file.
    #[arg(long)]
    pub(crate) force: bool,
}

impl OutputArgs {
    /// The writer's options.
    pub(crate) fn writer_options(&self) -> Result<WriterOptions> {
        let mut options = WriterOptions {
            compression: parse_compression(&self.compress)?,
            threads: self.threads,
            ..Default::default()
        };
        if let Some(kib) = self.extent_size {
            if !(4..=8192).contains(&kib) {
                bail!("--extent-size {kib}: give a size from 4 to 8192 KiB");
            }
            options.extent_payload = kib << 10;
        }
        Ok(options)
    }
}

/// Options of every command that reads disk images.
#[derive(clap::Args, Debug)]
struct SourceArgs {
    /// Also read qcow2 backing files inside DIR (repeatable); by default
    /// only those inside the named image's own directory are read.
    #[arg(long = "allow-backing", value_name = "DIR")]
    allow_backing: Vec<PathBuf>,
}

/// Arguments of `vma create`.
#[derive(clap::Args)]
struct CreateArgs {
    /// Archive to write, or `-` for standard output.
    archive: String,
    /// Disk images as [format=raw|qcow2:][NAME=]PATH; NAME defaults to
    /// the file stem. Without a format, a block device is raw, a file
    /// named *.qcow2 is qcow2, anything else raw (contents never decide).
    /// With `--format vma1` there may be none (a config-only archive, as
    /// Proxmox's `vma create` writes without drives).
    #[arg(value_name = "[format=F:][NAME=]IMAGE")]
    images: Vec<String>,
    #[command(flatten)]
    sources: SourceArgs,
    /// Config blob as [NAME=]FILE; NAME defaults to the file name. Repeatable.
    #[arg(long = "config", value_name = "[NAME=]FILE")]
    configs: Vec<String>,
    #[command(flatten)]
    output_options: OutputArgs,
    /// Archive format: the native one (3.0), or Proxmox VMA v1 for `qmrestore`.
    #[arg(long, value_enum, default_value = "native")]
    format: OutputFormat,
}

/// Archive formats `create` and `convert` can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    /// The native format (version 3.0); `v2` and `v3` are accepted as names for it.
    #[value(alias = "v2", alias = "v3")]
    Native,
    /// Proxmox VMA version 1, as `vzdump` writes it.
    Vma1,
}

/// Drive file formats `extract` can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExtractFormat {
    /// Sparse raw files (`<drive>.raw`).
    Raw,
    /// qcow2 version 3 images (`<drive>.qcow2`).
    Qcow2,
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
    if let Some(code) = pve::dispatch() {
        return code;
    }
    let cli = Cli::parse();
    let invocation = hints::Invocation::of(&cli.command);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vma: error: {}", one_line(&e));
            if let Some(next) = hints::next_step(&e, &invocation) {
                eprintln!("vma: next step: {next}");
            }
            if is_damage(&e) {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

/// True when an error means damage found in an archive (exit code 1)
/// rather than a usage or I/O error (2).
pub(crate) fn is_damage(e: &anyhow::Error) -> bool {
    e.downcast_ref::<DamageFound>().is_some()
        || e.chain().any(|c| {
            c.downcast_ref::<vma_core::Error>()
                .is_some_and(|v| v.is_damage())
        })
}

/// The error chain on one line, outermost first.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        match parts.last_mut() {
            // A context the inner message already says ("opening X" over
            // "opening X: No such file") is said once.
            Some(p) if s.starts_with(p.as_str()) => *p = s,
            Some(p) if p.contains(&s) => {}
            _ => parts.push(s),
        }
    }
    parts.join(": ")
}

fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet;
    output::set_verbose(cli.verbose);
    s3::install(&cli.s3)?;
    // Commands that write files remove their temporaries on SIGINT,
    // SIGTERM and SIGHUP; capture cancels its jobs first.
    match &cli.command {
        Command::Create(_)
        | Command::Extract { .. }
        | Command::Convert { .. }
        | Command::Diff { .. }
        | Command::Merge { .. }
        | Command::Prune { .. } => signals::install(signals::OnSignal::Exit),
        Command::Capture(_) => signals::install(signals::OnSignal::Cancel(&capture::CANCEL)),
        Command::Serve(_) => signals::install(signals::OnSignal::Cancel(&serve::STOP)),
        Command::LiveRestore(_) => {
            signals::install(signals::OnSignal::Cancel(&live_restore::CANCEL))
        }
        _ => {}
    }
    match cli.command {
        Command::Create(args) => create(&args, quiet),
        Command::List {
            archive,
            json,
            chain,
            parents,
        } => output::list(&archive, json, chain, &parents),
        Command::Config {
            archive,
            name,
            list,
            parents,
        } => config(&archive, name.as_deref(), list, &parents),
        Command::Verify {
            archive,
            json,
            threads,
            no_drive_digest,
            parents,
        } => output::verify(&archive, json, threads, !no_drive_digest, &parents, quiet),
        Command::Checksum {
            paths,
            sources,
            sha256,
            parents,
            threads,
        } => checksum(&paths, &sources, sha256, &parents, threads, quiet),
        Command::Extract {
            archive,
            target_dir,
            drives,
            force,
            threads,
            salvage,
            format,
            compress,
            drive_digest,
            parents,
            json,
            to,
            target_zeroed,
            no_space_check,
        } => {
            if !to.is_empty() {
                return targets::extract_to(
                    &archive,
                    &drives,
                    &to,
                    target_zeroed,
                    no_space_check,
                    threads,
                    quiet,
                );
            }
            let target_dir = target_dir.expect("required without --to");
            let format = match (format, compress) {
                (ExtractFormat::Raw, true) => {
                    bail!(
                        "--compress applies to --format qcow2; raw drive files are sparse instead"
                    )
                }
                (ExtractFormat::Raw, false) => DriveFormat::Raw,
                (ExtractFormat::Qcow2, compress) => DriveFormat::Qcow2 { compress },
            };
            let options = ExtractOptions {
                format,
                drives,
                force,
                threads,
                salvage,
                check_drive_digests: drive_digest,
                progress: None,
            };
            extract_cmd(
                &archive,
                &target_dir,
                options,
                &parents,
                (json, quiet, no_space_check),
            )
        }
        Command::Mount(args) => mount::mount(&args),
        Command::Capture(args) => capture::capture(&args, quiet),
        Command::Serve(args) => serve::serve(&args),
        Command::LiveRestore(args) => live_restore::live_restore(&args, quiet),
        Command::Umount { mountpoint } => mounts::umount(&mountpoint),
        Command::Convert {
            input,
            output,
            format,
            parents,
            salvage,
            output_options,
        } => convert(
            &input,
            &output,
            format,
            &parents,
            salvage,
            &output_options,
            quiet,
        ),
        Command::Completions { shell } => cli_docs::completions(shell),
        Command::Man { dir } => cli_docs::man(dir.as_deref()),
        Command::Diff {
            against,
            images,
            sources,
            output,
            parents,
            configs,
            output_options,
        } => diff(
            &against,
            &images,
            &sources,
            &output,
            &parents,
            &configs,
            &output_options,
            quiet,
        ),
        Command::Prune {
            paths,
            keep_last,
            dry_run,
            compress,
            threads,
        } => {
            let output_options = OutputArgs {
                compress,
                threads,
                extent_size: None,
                force: true,
            };
            prune(&paths, keep_last, dry_run, &output_options, quiet)
        }
        Command::Merge {
            archive,
            output,
            parents,
            output_options,
        } => merge(&archive, &output, &parents, &output_options, quiet),
    }
}

/// Open the disk images of arguments `[format=F:][NAME=]PATH` as the
/// drives of a new archive, printing the warnings they come with.
fn open_image_args(args: &[String], sources: &SourceArgs) -> Result<OpenedImages> {
    Ok(open_images(args, &sources.allow_backing, &mut |w| {
        eprintln!("vma: warning: {w}")
    })?)
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
fn open_input(archive: &str) -> Result<(Box<dyn Read + Send>, Option<PathBuf>)> {
    if archive == "-" {
        Ok((Box::new(std::io::stdin()), None))
    } else if s3::is_s3(archive) {
        s3::open_input(archive)
    } else {
        let f = File::open(archive).with_context(|| format!("opening {archive}"))?;
        Ok((Box::new(f), Some(PathBuf::from(archive))))
    }
}

/// An archive opened for one sequential pass, its path unless stdin, and
/// the whole-stream compression it was read through.
pub(crate) type OpenStream = (
    ArchiveStream<Box<dyn Read>>,
    Option<PathBuf>,
    StreamCompression,
);

/// Open any archive (v2 or VMA v1; plain, zstd, gzip or lzop) for one pass.
pub(crate) fn open_stream(archive: &str) -> Result<OpenStream> {
    let (input, path) = open_input(archive)?;
    let name = if archive == "-" {
        "standard input"
    } else {
        archive
    };
    let (stream, compression) = open_any(input, name)?;
    Ok((stream, path, compression))
}

fn create(args: &CreateArgs, quiet: bool) -> Result<()> {
    let CreateArgs {
        archive,
        images: image_args,
        sources,
        configs: config_args,
        output_options,
        format,
    } = args;
    let (force, format) = (output_options.force, *format);
    let options = output_options.writer_options()?;
    let OpenedImages { drives, images } = open_image_args(image_args, sources)?;
    let configs = read_configs(config_args)?;
    check_member_names(
        drives.iter().map(|d| d.name.as_str()),
        configs.iter().map(|c| c.name.as_str()),
    )?;
    let vma1 = format == OutputFormat::Vma1;
    if drives.is_empty() && (!vma1 || configs.is_empty()) {
        bail!(
            "give at least one disk image (only a VMA v1 archive, --format vma1, may hold configs alone)"
        );
    }
    if vma1 {
        note_v1_sizes(&drives, quiet);
    }
    let meta = ArchiveMeta::new(drives.clone(), configs);
    let total: u64 = drives.iter().map(|d| d.size).sum();
    let progress = Progress::bytes(total, "create", quiet);
    let options = CreateOptions {
        vma1,
        writer: options,
        progress: progress.callback(),
    };
    let stored = create_archive(
        &ArchiveOutput::new(archive, force),
        meta,
        &images,
        &options,
        &mut signals::say_stale,
        &|pos| progress.set(pos),
        &mut pve::tally(&drives),
    )?;
    progress.finish();
    if !quiet {
        eprintln!(
            "vma: wrote {} ({}, {} logical, {} stored)",
            archive,
            count(drives.len(), "drive"),
            human_bytes(total),
            human_bytes(stored),
        );
    }
    Ok(())
}

/// Say which drives a VMA v1 archive stores with a size rounded up to
/// whole 512-byte sectors (see `vma_core::format::v1::stored_size`).
fn note_v1_sizes(drives: &[DriveInfo], quiet: bool) {
    for d in drives {
        let stored = vma_core::format::v1::stored_size(d.size);
        if stored != d.size && !quiet {
            eprintln!(
                "vma: drive {} is {} bytes, not whole 512-byte sectors: VMA v1 stores it as {stored} bytes (a zero tail), as QEMU presents it",
                d.name, d.size
            );
        }
    }
}

/// `vma merge`: the chain's newest point in time as a synthetic full,
/// streamed from the chain's extents (see `vma_core::ops::merge`). The uuid is
/// new; time, drives and configs (the capture record with its checkpoints
/// included) are the newest archive's, and the output stands in for the
/// newest archive, so archives made on top of it resolve against it.
fn merge(
    archive: &Path,
    output: &str,
    parents: &[PathBuf],
    output_options: &OutputArgs,
    quiet: bool,
) -> Result<()> {
    let chain = Arc::new(
        Chain::open(archive, parents).with_context(|| format!("opening {}", archive.display()))?,
    );
    let (summary, stored) = write_synthetic_full(&chain, output, output_options, quiet)?;
    if !quiet {
        eprintln!(
            "vma: wrote {output} from {} archive(s) ({} stored): {}",
            summary.links,
            human_bytes(stored),
            merge_words(&summary)
        );
    }
    Ok(())
}

/// What a merge copied and encoded again, in words.
fn merge_words(s: &vma_core::ops::merge::MergeSummary) -> String {
    format!(
        "{} extents ({} clusters) copied as stored, {} extents decoded to encode their current clusters again ({} clusters)",
        s.copied_extents, s.copied_clusters, s.reencoded_extents, s.reencoded_clusters
    )
}

/// Write the synthetic full of `chain`'s newest point to `output` (`-`:
/// standard output) with a progress bar; `check` sees the finished archive
/// file before it is renamed into place. Returns what the merge did and
/// the bytes written.
fn write_synthetic_full(
    chain: &Arc<Chain>,
    output: &str,
    output_options: &OutputArgs,
    quiet: bool,
) -> Result<(vma_core::ops::merge::MergeSummary, u64)> {
    let total: u64 = chain.header().drives.iter().map(|d| d.size).sum();
    let progress = Progress::bytes(total, "merge", quiet);
    let written = vma_core::ops::merge::write_synthetic_full(
        chain,
        ArchiveOutput::new(output, output_options.force),
        &output_options.writer_options()?,
        &MergeOptions {
            threads: output_options.threads,
        },
        progress.callback(),
        &mut signals::say_stale,
        |_| Ok(()),
    )?;
    progress.finish();
    Ok(written)
}

/// `vma prune`: plan (vma_core::ops::prune), then write each synthetic full over
/// the point it replaces (checked before it is renamed into place), check
/// that every remaining chain resolves, and only then delete.
fn prune(
    paths: &[PathBuf],
    keep: usize,
    dry_run: bool,
    output_options: &OutputArgs,
    quiet: bool,
) -> Result<()> {
    let (archives, dirs) = match paths {
        [dir] if dir.is_dir() || s3::is_prefix(dir) => (archives_in(dir)?, vec![dir.clone()]),
        _ => {
            let mut dirs: Vec<PathBuf> = Vec::new();
            for p in paths {
                if !(p.is_file() || s3::is_object(p)) {
                    bail!(
                        "{} is not an archive file (give one directory, or archive files)",
                        p.display()
                    );
                }
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
                let dir = dir.unwrap_or(Path::new(".")).to_path_buf();
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
            (paths.to_vec(), dirs)
        }
    };
    if archives.is_empty() {
        bail!("no archives in {}", paths[0].display());
    }
    if !dry_run {
        for d in dirs.iter().filter(|d| !s3::is_s3_path(d)) {
            signals::clear_stale(d)?;
        }
    }
    let mut beside = Vec::new();
    for d in &dirs {
        beside.extend(files_in(d)?);
    }
    let plan = plan_prune(&archives, keep, &beside)?;
    // What prune does is said as it goes; a closed stdout must not stop
    // it half-way, so write errors are ignored here.
    let say = |line: String| {
        if !quiet {
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
    };
    let names = |ps: &[PathBuf]| {
        ps.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for c in &plan.chains {
        say(format!(
            "chain of {} archive(s), full {}:",
            c.links.len(),
            c.links[0].display()
        ));
        if let Some(k) = &c.fold {
            say(format!(
                "  fold: {} becomes a synthetic full of its point in time ({} older archive(s) folded in)",
                k.display(),
                c.delete.len()
            ));
        }
        if !c.keep.is_empty() {
            say(format!("  keep: {}", names(&c.keep)));
        }
        if !c.delete.is_empty() {
            say(format!("  delete: {}", names(&c.delete)));
        }
    }
    if plan.is_empty() {
        say(format!(
            "nothing to prune: the newest {keep} point(s) in time need every archive"
        ));
        return Ok(());
    }
    if dry_run {
        say("dry run: nothing changed".into());
        return Ok(());
    }
    let options = PruneOptions {
        writer: output_options.writer_options()?,
        threads: output_options.threads,
    };
    execute_prune(
        &plan,
        &archives,
        &dirs,
        &options,
        &mut PruneSay { quiet, bar: None },
    )?;
    Ok(())
}

/// What `vma prune` says as it goes: one line per step on standard output
/// (a closed stdout must not stop it half-way, so write errors are
/// ignored), and a progress bar while a synthetic full is written.
struct PruneSay {
    quiet: bool,
    bar: Option<Progress>,
}

impl PruneObserver for PruneSay {
    fn event(&mut self, event: PruneEvent<'_>) {
        let line = match event {
            PruneEvent::Folded {
                path,
                summary,
                stored,
            } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish();
                }
                format!(
                    "wrote {}: synthetic full of its point in time from {} archive(s) ({} stored; {})",
                    path.display(),
                    summary.links,
                    human_bytes(stored),
                    merge_words(summary)
                )
            }
            PruneEvent::Kept { path, why } => format!("kept {}: {why}", path.display()),
            PruneEvent::Deleted { path } => format!("deleted {}", path.display()),
            _ => return,
        };
        if !self.quiet {
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
    }

    fn progress(&mut self, _path: &Path, total: u64) -> Option<vma_core::util::ProgressFn> {
        let bar = Progress::bytes(total, "merge", self.quiet);
        let callback = bar.callback();
        self.bar = Some(bar);
        callback
    }

    fn stale(&mut self, stale: &vma_core::atomic::StaleTemporary) {
        signals::say_stale(stale);
    }
}

/// `vma diff`: each image against the same-named drive of the chain ending
/// at `against`; a drive PARENT lacks, or whose size changed, is stored in
/// full.
#[allow(clippy::too_many_arguments)]
fn diff(
    against: &Path,
    image_args: &[String],
    source_args: &SourceArgs,
    output: &str,
    parents: &[PathBuf],
    config_args: &[String],
    output_options: &OutputArgs,
    quiet: bool,
) -> Result<()> {
    let chain = Arc::new(
        Chain::open(against, parents).with_context(|| format!("opening {}", against.display()))?,
    );
    chain.refuse_interrupted(|_| true)?;
    let OpenedImages { drives, images } = open_image_args(image_args, source_args)?;
    // The VM configs of the parent's point in time go forward unless new
    // ones are given.
    let configs = if config_args.is_empty() {
        chain.point_configs().vm_configs()
    } else {
        read_configs(config_args)?
    };
    check_member_names(
        drives.iter().map(|d| d.name.as_str()),
        configs.iter().map(|c| c.name.as_str()),
    )?;
    let meta = ArchiveMeta::new(drives.clone(), configs);
    let options = CreateOptions {
        writer: output_options.writer_options()?,
        ..Default::default()
    };
    let total: u64 = drives.iter().map(|d| d.size).sum();
    let progress = Progress::bytes(total, "diff", quiet);
    let (stats, written) = diff_archive(
        &ArchiveOutput::new(output, output_options.force),
        &chain,
        meta,
        &images,
        &options,
        &mut signals::say_stale,
        &|pos| progress.set(pos),
    )?;
    progress.finish();
    if !quiet {
        for (d, s) in drives.iter().zip(&stats) {
            match s {
                Some(s) => eprintln!(
                    "vma: drive {}: {} clusters differ, {} unchanged",
                    d.name, s.changed, s.unchanged
                ),
                None => eprintln!(
                    "vma: drive {}: stored in full (not in the parent with this size)",
                    d.name
                ),
            }
        }
        eprintln!("vma: wrote {output} ({} stored)", human_bytes(written));
    }
    Ok(())
}

/// Config blobs from `--config [NAME=]FILE` arguments (NAME defaults to
/// the file name), each within the size limit.
pub(crate) fn read_configs(args: &[String]) -> Result<Vec<ConfigBlob>> {
    let mut configs = Vec::new();
    for arg in args {
        let (name, path) = named_arg(arg, "config", Path::file_name)?;
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
    Ok(configs)
}

fn convert(
    input: &str,
    output: &str,
    format: OutputFormat,
    parents: &[PathBuf],
    salvage: bool,
    output_options: &OutputArgs,
    quiet: bool,
) -> Result<()> {
    let (stream, path, stream_compression) = open_stream(input)?;
    let header = stream.header().clone();
    let source_format = stream.format();
    let vma1 = format == OutputFormat::Vma1;
    if vma1 {
        note_v1_sizes(&header.drives, quiet);
    } else if header.drives.is_empty() {
        bail!(
            "{input} holds configs only (no drives), and a native archive needs at least one drive: read the configs with `vma config` or `vma extract`, or convert with --format vma1"
        );
    }
    if header.parent.is_some() && source_format == ArchiveFormat::V2 && !vma1 {
        bail!(
            "{input} is an incremental archive of version 2.0: its parent cannot prove its content to a 3.0 archive; merge it into a full first (`vma merge {input} -o FULL`, which writes a 3.0 full)"
        );
    }
    // A 3.0 incremental archive converts to one with the same parent, whose
    // leaves give the drive digests of the unchanged clusters.
    let ancestors = if header.parent.is_some() && !vma1 {
        Chain::open_parent(&header, path.as_deref(), parents)?.map(Arc::new)
    } else {
        None
    };
    let total = match (&path, stream_compression) {
        (Some(p), StreamCompression::None) => s3::input_len(p),
        _ => 0,
    };
    let progress = Progress::bytes(total, "convert", quiet);
    let options = ConvertOptions {
        vma1,
        writer: output_options.writer_options()?,
        threads: output_options.threads,
        salvage,
        progress: progress.callback(),
        reencode: output_options.extent_size.is_some(),
    };
    let (report, bytes) = convert_archive(
        stream,
        ancestors.as_ref(),
        &ArchiveOutput::new(output, output_options.force),
        &options,
        &mut signals::say_stale,
        &|pos| progress.set(pos),
    )?;
    progress.finish();
    if salvage {
        salvage::outcome(&report, output)?;
    }
    if !quiet {
        eprintln!(
            "vma: wrote {output} ({}, {})",
            match format {
                OutputFormat::Native => "vma 3.0",
                OutputFormat::Vma1 => "Proxmox VMA v1",
            },
            human_bytes(bytes)
        );
    }
    Ok(())
}

/// `vma checksum`: the drive digest (or plain SHA-256) of images and of
/// every drive of archives.
fn checksum(
    args: &[String],
    sources: &SourceArgs,
    sha256: bool,
    parents: &[PathBuf],
    threads: usize,
    quiet: bool,
) -> Result<()> {
    for arg in args {
        let mut items: Vec<(String, Box<dyn DiskImage>)> = Vec::new();
        let (format, path) = split_format(arg)?;
        let path = PathBuf::from(path);
        if format.is_none() && (s3::is_s3_path(&path) || is_archive_file(&path)?) {
            let chain = Arc::new(
                Chain::open(&path, parents)
                    .with_context(|| format!("opening {}", path.display()))?,
            );
            chain.refuse_interrupted(|_| true)?;
            // Read in order: a small cache of decoded extents is enough.
            for link in chain.links() {
                link.set_cache_bytes(16 << 20);
            }
            for d in &chain.header().drives {
                items.push((
                    format!("{}:{}", path.display(), d.name),
                    Box::new(ChainDrive::new(chain.clone(), d.id)?),
                ));
            }
        } else {
            let opened = open_source(&path, format, &sources.allow_backing)?;
            if let Some(w) = &opened.warning {
                eprintln!("vma: warning: {w}");
            }
            items.push((path.display().to_string(), opened.image));
        }
        for (name, image) in items {
            let what = if sha256 { "sha256" } else { "checksum" };
            let progress = Progress::bytes(image.size(), what, quiet);
            let digest = if sha256 {
                vma_core::ops::checksum::sha256(image.as_ref(), &mut |n| progress.set(n))
            } else {
                vma_core::ops::checksum::tree_digest(image.as_ref(), threads, &mut |n| {
                    progress.set(n)
                })
            }
            .with_context(|| format!("hashing {name}"))?;
            progress.finish();
            outln!("{}  {name}", hex::encode(digest));
        }
    }
    Ok(())
}

/// Whether `vma checksum` reads `path` as an archive: a regular file not
/// named as a disk image (`.raw`, `.img`, `.qcow2`) whose first bytes are
/// an archive's. A disk image's contents belong to its guest: one named as
/// an image, or given with `format=`, is never looked into.
fn is_archive_file(path: &Path) -> Result<bool> {
    let named_image = path.extension().is_some_and(|e| {
        ["raw", "img", "qcow2"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    });
    let meta = std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
    if named_image || !meta.is_file() {
        return Ok(false);
    }
    let mut magic = [0u8; vma_core::read::detect::DETECT_LEN];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(matches!(
        vma_core::read::detect::detect(&magic[..n]),
        Some(
            vma_core::read::detect::DetectedFormat::Native
                | vma_core::read::detect::DetectedFormat::VmaV1
                | vma_core::read::detect::DetectedFormat::Zstd
                | vma_core::read::detect::DetectedFormat::Gzip
                | vma_core::read::detect::DetectedFormat::Lzo
        )
    ))
}

/// `vma config`: a config blob of the archive's point in time (stored in
/// it, or in the nearest ancestor that stores VM configs).
fn config(archive: &str, name: Option<&str>, list: bool, parents: &[PathBuf]) -> Result<()> {
    let (stream, path, _) = open_stream(archive)?;
    let header = stream.header().clone();
    drop(stream);
    let (point, problem) = output::listed_configs(&header, path.as_deref(), parents);
    if let Some(problem) = problem {
        bail!("{problem}");
    }
    let configs = point.blobs();
    let mut out = std::io::stdout().lock();
    if list {
        for c in &configs {
            writeln!(out, "{}", c.name)?;
        }
        return Ok(());
    }
    let blob = match name {
        Some(n) => configs.iter().find(|c| c.name == n).ok_or_else(|| {
            let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
            anyhow!(
                "the archive has no config named {n:?} (it has: {})",
                names.join(", ")
            )
        })?,
        None => configs
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
    options: ExtractOptions,
    parents: &[PathBuf],
    (json, quiet, no_space_check): (bool, bool, bool),
) -> Result<()> {
    let target = outdir::TargetDir::check(dir)?;
    let result = extract_into(archive, dir, options, parents, json, quiet, no_space_check);
    match &result {
        Ok(()) => target.keep(),
        Err(_) => target.undo(),
    }
    result
}

fn extract_into(
    archive: &str,
    dir: &Path,
    options: ExtractOptions,
    parents: &[PathBuf],
    json: bool,
    quiet: bool,
    no_space_check: bool,
) -> Result<()> {
    signals::clear_stale(dir)?;
    let (stream, path, compression) = open_stream(archive)?;
    if !no_space_check && !stream.format().is_native() {
        let len = space::archive_len(path.as_deref(), compression);
        space::check_v1_dir(dir, stream.header(), &options.drives, len)?;
    } else if let (false, Some(p), StreamCompression::None) = (no_space_check, &path, compression) {
        // Compressed qcow2 output is smaller than the data: not checked.
        let qcow2 = match options.format {
            DriveFormat::Raw => Some(false),
            DriveFormat::Qcow2 { compress: false } => Some(true),
            DriveFormat::Qcow2 { compress: true } => None,
        };
        if let Some(qcow2) = qcow2 {
            space::check_native_dir(dir, p, &options.drives, qcow2)?;
        }
    }
    let ancestors = Chain::open_parent(stream.header(), path.as_deref(), parents)?;
    let total = match (&path, compression) {
        (Some(p), StreamCompression::None) => s3::input_len(p),
        _ => 0,
    };
    let progress = Progress::bytes(total, "extract", quiet || json);
    let options = ExtractOptions {
        progress: progress.callback(),
        ..options
    };
    let summary = extract(stream, dir, &options, ancestors.as_ref(), |pos| {
        progress.set(pos)
    })?;
    progress.finish();
    let report = &summary.report;
    let doc = vma_core::ops::report::ExtractDocument::of(&summary);
    let damage = &doc.damage;
    if json {
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else if !quiet {
        for f in &doc.files {
            eprintln!("vma: wrote {} ({})", f.path, human_bytes(f.size));
        }
    }
    if report.is_clean() {
        return Ok(());
    }
    if !json {
        output::print_damage_text(damage, "written as zeros");
    }
    Err(Damage(format!(
        "salvaged what was intact; {} in {} range(s) could not be recovered",
        human_bytes(damage.lost_bytes),
        report.missing.len() + report.damaged.len() + report.conflicting.len()
    ))
    .into())
}

/// An archive opened for listing: with its index when it is a complete
/// uncompressed file, otherwise just its header and why that is all.
pub(crate) struct Opened {
    pub(crate) header: vma_core::Header,
    pub(crate) format: ArchiveFormat,
    pub(crate) compression: StreamCompression,
    pub(crate) reader: Option<Reader>,
    pub(crate) problem: Option<String>,
}

/// Open an archive for `list`: through the Reader when possible (stored
/// sizes, digests), else from its header alone.
pub(crate) fn open_for_listing(archive: &str) -> Result<Opened> {
    let (stream, _, compression) = open_stream(archive)?;
    let mut opened = Opened {
        header: stream.header().clone(),
        format: stream.format(),
        compression,
        reader: None,
        problem: None,
    };
    drop(stream);
    if archive != "-" && compression == StreamCompression::None {
        match Reader::open(Path::new(archive)) {
            Ok(r) => opened.reader = Some(r),
            Err(e) if e.is_damage() => opened.problem = Some(e.to_string()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(opened)
}

pub(crate) use DamageFound as Damage;

/// True when progress bars should be drawn.
pub(crate) fn progress_wanted(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// `n` things, in words: "1 drive", "2 drives".
pub(crate) fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

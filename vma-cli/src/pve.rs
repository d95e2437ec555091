//! Proxmox VE compatibility: the command lines of Proxmox's own `vma`
//! (`list`, `config -c`, `create -v -c -d`, `extract -v -d -r`, `verify -v`),
//! with its output lines, file names, exit codes and the `-r FIFO`
//! device map protocol that `qmrestore` speaks, so `vma` can stand in for
//! `/usr/bin/vma` on a Proxmox VE node.
//!
//! Which grammar applies: `VMA_COMPAT=proxmox` selects it for every one
//! of the five subcommands, `VMA_COMPAT=native` never; otherwise it is
//! selected when the arguments are all in Proxmox's grammar (short
//! options of the subcommand, operands) and use a form only Proxmox's
//! `vma` has: `config -c`, `create -c|-d` or an `exec:` archive,
//! `extract -r|-d`, `verify -v`. `vma list FILE`, `vma config FILE` and
//! `vma extract -v FILE DIR` without such a form are our own commands.
//!
//! Restoring goes through [`crate::targets`], the mechanism of
//! `vma extract --to`: a map line is one more way to name a target.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::targets::{self, Counts, Groups, RestoreError, SizeMismatch, Target, TargetSpec, Zeros};
use vma_core::types::ClusterObserver;
use vma_core::{ClusterNo, DriveId, DriveInfo, Header};

const USAGE: &str = "usage: vma command [command options]

vma list <filename>
vma config <filename> [-c <config>]
vma create <filename> [-c <config>] [-d format=<format>:<device name>=<path> [-d ...]]
vma extract <filename> [-d <drive-list>] [-r <fifo>] <targetdir>
vma verify <filename> [-v]
";

/// Proxmox allows a restore target this much larger than the drive
/// (LVM rounds volumes up to 4 MiB extents).
const SLACK: u64 = 4 << 20;

/// A failure, printed as Proxmox prints it (`vma: ` then the message).
struct Fatal(String, u8);

fn fatal(message: impl Into<String>) -> Fatal {
    Fatal(message.into(), 1)
}

/// Run the Proxmox grammar if it applies to this command line.
pub fn dispatch() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.into_string().ok())
        .collect::<Option<Vec<_>>>()?;
    let sub = args.get(1)?.as_str();
    let spec = match sub {
        "list" => "h",
        "config" => "hc:",
        "create" => "hvc:d:",
        "extract" => "hvd:r:",
        "verify" => "hv",
        _ => return None,
    };
    let rest = &args[2..];
    match std::env::var("VMA_COMPAT").as_deref() {
        Ok("native") => return None,
        Ok("proxmox") => {}
        _ => {
            if !looks_proxmox(sub, spec, rest) {
                return None;
            }
        }
    }
    Some(run(sub, spec, rest))
}

/// Whether `rest` uses a form only Proxmox's grammar has.
fn looks_proxmox(sub: &str, spec: &str, rest: &[String]) -> bool {
    // The options that only Proxmox's grammar has (`-v` alone does not
    // decide for `create` and `extract`).
    let marking = match sub {
        "config" => "c",
        "create" => "cd",
        "extract" => "dr",
        "verify" => "v",
        _ => "",
    };
    let mut marks = false;
    let mut i = 0;
    while i < rest.len() {
        let a = &rest[i];
        if a == "--" {
            break;
        }
        if a.starts_with("--") {
            return false; // one of our long options
        }
        if let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) {
            let mut chars = flags.chars();
            while let Some(c) = chars.next() {
                match spec.find(c) {
                    Some(p) if c != 'h' => {
                        marks |= marking.contains(c);
                        if spec[p + 1..].starts_with(':') {
                            if chars.as_str().is_empty() {
                                i += 1;
                            }
                            break;
                        }
                    }
                    _ => return false,
                }
            }
        } else if sub == "create" && a.starts_with("exec:") {
            marks = true;
        }
        i += 1;
    }
    marks
}

fn run(sub: &str, spec: &str, rest: &[String]) -> ExitCode {
    let (opts, operands) = match getopt(sub, spec, rest) {
        Ok(p) => p,
        Err(message) => {
            eprintln!("{message}");
            return usage();
        }
    };
    if opts.iter().any(|(c, _)| *c == 'h') {
        return usage();
    }
    let result = match sub {
        "list" if operands.len() == 1 => list(&operands[0]),
        "config" if operands.len() == 1 => config(&operands[0], &opts),
        "verify" if operands.len() == 1 => verify(&operands[0], &opts),
        "extract" if operands.len() == 2 => extract(&operands[0], Path::new(&operands[1]), &opts),
        "create" if !operands.is_empty() => create(&operands, &opts),
        _ => return usage(),
    };
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fatal(message, code)) => {
            if !message.is_empty() {
                eprintln!("{message}");
            }
            ExitCode::from(code)
        }
    }
}

fn usage() -> ExitCode {
    print!("{USAGE}");
    let _ = std::io::stdout().flush();
    ExitCode::from(1)
}

type Opts = Vec<(char, Option<String>)>;

/// glibc `getopt(3)` with GNU argument permutation: options anywhere,
/// clustered flags, attached or separate values, `--` ends options, a
/// lone `-` is an operand.
fn getopt(sub: &str, spec: &str, args: &[String]) -> Result<(Opts, Vec<String>), String> {
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            operands.extend(args[i..].iter().cloned());
            break;
        }
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            operands.push(a.clone());
            continue;
        };
        for (at, c) in flags.char_indices() {
            let Some(p) = spec.find(c).filter(|_| c != ':') else {
                return Err(format!("{sub}: invalid option -- '{c}'"));
            };
            if spec[p + 1..].starts_with(':') {
                let attached = &flags[at + c.len_utf8()..];
                let value = if !attached.is_empty() {
                    attached.to_owned()
                } else if i < args.len() {
                    i += 1;
                    args[i - 1].clone()
                } else {
                    return Err(format!("{sub}: option requires an argument -- '{c}'"));
                };
                opts.push((c, Some(value)));
                break;
            }
            opts.push((c, None));
        }
    }
    Ok((opts, operands))
}

/// An I/O error as C's `strerror` words it (without Rust's "(os error N)").
fn errstr(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn flag(opts: &Opts, c: char) -> bool {
    opts.iter().any(|(o, _)| *o == c)
}

fn last_value(opts: &Opts, c: char) -> Option<String> {
    opts.iter()
        .rev()
        .find(|(o, _)| *o == c)
        .and_then(|(_, v)| v.clone())
}

type Stream = vma_core::ArchiveStream<Box<dyn std::io::Read>>;

fn open(filename: &str) -> Result<Stream, Fatal> {
    match crate::open_stream(filename) {
        Ok((stream, _, _)) => Ok(stream),
        Err(e) => Err(fatal(format!("vma: {}", crate::one_line(&e)))),
    }
}

/// The local time of `t` as C's `ctime(3)` prints it (without the newline).
fn ctime(t: i64) -> String {
    // SAFETY: localtime_r and strftime write into buffers we own.
    unsafe {
        let tt = t as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&tt, &mut tm).is_null() {
            return t.to_string();
        }
        let mut buf = [0u8; 64];
        let n = libc::strftime(
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
            c"%a %b %e %H:%M:%S %Y".as_ptr(),
            &tm,
        );
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// The CFG/DEV/VMSTATE/CTIME block of `list` (and of `extract -r`, `verify -v`).
fn header_block(h: &Header) -> String {
    let mut s = String::new();
    for c in &h.configs {
        s += &format!("CFG: size: {} name: {}\n", c.data.len(), c.name);
    }
    let mut drives: Vec<_> = h.drives.iter().collect();
    drives.sort_by_key(|d| d.id.0);
    for d in drives {
        if d.name == "vmstate" {
            s += &format!("VMSTATE: dev_id={} memory: {}\n", d.id.0, d.size);
        } else {
            s += &format!(
                "DEV: dev_id={} size: {} devname: {}\n",
                d.id.0, d.size, d.name
            );
        }
    }
    s += &format!("CTIME: {}\n", ctime(h.ctime));
    s
}

fn out(text: &str) -> Result<(), Fatal> {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())
        .and_then(|()| o.flush())
        .map_err(|e| fatal(format!("vma: writing standard output: {e}")))
}

fn list(filename: &str) -> Result<(), Fatal> {
    let stream = open(filename)?;
    out(&header_block(stream.header()))
}

fn config(filename: &str, opts: &Opts) -> Result<(), Fatal> {
    let name = last_value(opts, 'c').unwrap_or_else(|| "qemu-server.conf".into());
    let stream = open(filename)?;
    match stream.header().configs.iter().find(|c| c.name == name) {
        Some(c) => {
            let mut o = std::io::stdout().lock();
            o.write_all(&c.data)
                .and_then(|()| o.flush())
                .map_err(|e| fatal(format!("vma: writing standard output: {e}")))
        }
        None => Err(Fatal(
            format!("unable to find configuration data '{name}'"),
            255,
        )),
    }
}

/// `%.3g` of C's printf.
fn g3(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    let s = if !(-4..3).contains(&exp) {
        let m = format!("{:.2e}", v);
        let (mant, e) = m.split_once('e').unwrap_or((&m, "0"));
        let mant = strip_zeros(mant);
        let e: i32 = e.parse().unwrap_or(0);
        format!("{mant}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    } else {
        let decimals = (2 - exp).max(0) as usize;
        strip_zeros(&format!("{:.*}", decimals, v))
    };
    s
}

fn strip_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s.to_owned()
    }
}

/// Progress lines of `-v` (printed when the percentage changes).
struct ProgressLines {
    total_clusters: u64,
    last: u64,
    start: Instant,
    verbose: bool,
}

impl ProgressLines {
    fn tick(&mut self, c: &Counts) {
        if !self.verbose || self.total_clusters == 0 {
            return;
        }
        let p = c.clusters * 100 / self.total_clusters;
        if p != self.last {
            self.last = p;
            let _ = out(&format!(
                "progress {p}% (read {} bytes, duration {} sec)\n",
                c.clusters * 65536,
                self.start.elapsed().as_secs()
            ));
        }
    }

    fn summary(&self, c: &Counts) -> Result<(), Fatal> {
        if !self.verbose {
            return Ok(());
        }
        let total = c.clusters * 65536;
        if total == 0 {
            return out("vma archive contains no image data\n");
        }
        let mut s = format!(
            "total bytes read {total}, sparse bytes {} ({}%)\n",
            c.zero_bytes,
            g3(c.zero_bytes as f64 * 100.0 / total as f64)
        );
        if c.zero_bytes != total {
            let data = total - c.zero_bytes;
            s += &format!(
                "space reduction due to 4K zero blocks {}%\n",
                g3(c.partial_zero_bytes as f64 * 100.0 / data as f64)
            );
        }
        out(&s)
    }
}

fn restore_failed(what: &str, e: anyhow::Error) -> Fatal {
    if let Some(r) = e.downcast_ref::<RestoreError>() {
        if let Some((dev, c)) = &r.missing {
            return fatal(format!(
                "vma: {what} failed - detected missing cluster {c} for stream {dev}\n({}; `vma extract --salvage` keeps what is intact)",
                r.message
            ));
        }
    }
    fatal(format!("vma: {what} failed - {}", crate::one_line(&e)))
}

fn verify(filename: &str, opts: &Opts) -> Result<(), Fatal> {
    let verbose = flag(opts, 'v');
    let stream = open(filename)?;
    let header = stream.header().clone();
    if verbose {
        out(&header_block(&header))?;
    }
    let mut lines = ProgressLines {
        total_clusters: header.drives.iter().map(|d| d.size / 65536).sum(),
        last: 0,
        start: Instant::now(),
        verbose,
    };
    let mut none: Vec<Option<Target>> = (0..=255).map(|_| None).collect();
    let restored = targets::restore(stream, &mut none, 0, true, |c| lines.tick(c))
        .map_err(|e| restore_failed("verify", e))?;
    lines.summary(&restored.counts)
}

/// One parsed line of the `-r` map.
enum MapLine {
    Skip(String),
    Target(String, TargetSpec, Option<String>),
}

fn parse_map_line(line: &str) -> Result<MapLine, String> {
    if line.starts_with("skip") {
        return match line.strip_prefix("skip=") {
            Some(name) if !name.is_empty() => Ok(MapLine::Skip(name.to_owned())),
            _ => Err(format!("option 'skip' has no value ('{line}')")),
        };
    }
    let mut rest = line;
    let mut format = None;
    let mut bps = None;
    let mut group = None;
    let mut cache = None;
    loop {
        let name = ["format", "throttling.bps", "throttling.group", "cache"]
            .into_iter()
            .find(|n| {
                rest.strip_prefix(n)
                    .is_some_and(|r: &str| r.starts_with('='))
            });
        let Some(name) = name else { break };
        let after = &rest[name.len() + 1..];
        let Some(end) = after.find(':') else {
            return Err(format!("option '{name}' not terminated ('{line}')"));
        };
        let value = after[..end].to_owned();
        let slot = match name {
            "format" => &mut format,
            "throttling.bps" => &mut bps,
            "throttling.group" => &mut group,
            _ => &mut cache,
        };
        if slot.is_some() {
            return Err(format!("duplicate value for option '{name}'"));
        }
        *slot = Some(value);
        rest = &after[end + 1..];
    }
    let zeros = match rest.get(..2) {
        Some("0:") => Zeros::Skip,
        Some("1:") => Zeros::Establish,
        _ => return Err(format!("parse error ('{line}')")),
    };
    let Some((dev, path)) = rest[2..].split_once('=') else {
        return Err(format!("no dev name specified ('{line}')"));
    };
    let bps = match bps {
        None => None,
        Some(v) => Some(parse_c_number(&v).ok_or_else(|| format!("not a number: {v}"))?),
    };
    let mut spec = TargetSpec::new(path);
    spec.format = format;
    spec.zeros = zeros;
    spec.bps = bps;
    spec.group = group;
    spec.max_slack = Some(SLACK);
    spec.space_check = false;
    Ok(MapLine::Target(dev.to_owned(), spec, cache))
}

/// An unsigned number with C's base-0 rules (`0x` hex, leading `0` octal).
fn parse_c_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

/// Read the map from the FIFO: lines until `done`, an empty line or EOF.
fn read_map(fifo: &str) -> Result<Vec<MapLine>, Fatal> {
    let f = std::fs::File::open(fifo)
        .map_err(|e| fatal(format!("vma: unable to open fifo {fifo} - {}", errstr(&e))))?;
    let mut r = BufReader::new(f);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .map_err(|e| fatal(format!("vma: read map failed - {}", errstr(&e))))?;
        if n == 0 || line == "\n" || line == "done\n" {
            break;
        }
        let text = line.strip_suffix('\n').unwrap_or(&line);
        lines.push(parse_map_line(text).map_err(|m| fatal(format!("vma: read map failed - {m}")))?);
    }
    Ok(lines)
}

/// The cache mode of a map line (QEMU's names; none given: `writeback`).
fn cache_mode(cache: &Option<String>) -> Result<targets::Cache, Fatal> {
    match cache.as_deref() {
        None => Ok(targets::Cache::Writeback),
        Some(m) => targets::Cache::parse(m).ok_or_else(|| {
            fatal(format!(
                "vma: invalid cache option: {m}\n(the cache modes are none, off, writeback, writethrough, directsync and unsafe)"
            ))
        }),
    }
}

/// A config blob name that stays inside the target directory.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(|c| c.is_control())
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), Fatal> {
    let tmp = path.with_file_name(format!(
        ".{}.partial-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fatal(format!(
                "vma: unable to write file: {}: {e}",
                path.display()
            ))
        })
}

fn extract(filename: &str, dir: &Path, opts: &Opts) -> Result<(), Fatal> {
    let verbose = flag(opts, 'v');
    let fifo = last_value(opts, 'r');
    let only: Option<Vec<String>> =
        last_value(opts, 'd').map(|l| l.split(',').map(str::to_owned).collect());
    let stream = open(filename)?;
    let header = stream.header().clone();
    if header.parent.is_some() {
        return Err(fatal(format!(
            "vma: {}",
            crate::one_line(
                &vma_core::ops::extract::refuse_incremental(&header)
                    .unwrap_err()
                    .into()
            )
        )));
    }
    std::fs::DirBuilder::new().create(dir).map_err(|e| {
        fatal(format!(
            "vma: unable to create target directory {} - {}",
            dir.display(),
            errstr(&e)
        ))
    })?;
    for c in &header.configs {
        if !safe_name(&c.name) {
            return Err(fatal(format!(
                "vma: config name {:?} would leave the target directory; refusing to write it",
                c.name
            )));
        }
        write_file(&dir.join(&c.name), &c.data)?;
    }
    let map = match &fifo {
        Some(f) => {
            out(&header_block(&header))?;
            Some(read_map(f)?)
        }
        None => None,
    };
    let mut drives: Vec<_> = header.drives.iter().collect();
    drives.sort_by_key(|d| d.id.0);
    let mut targets: Vec<Option<Target>> = (0..=255).map(|_| None).collect();
    let mut groups = Groups::default();
    let mut renames: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut devinfo = String::new();
    for d in drives {
        let spec = if d.name == "vmstate" {
            let path = dir.join("vmstate.bin");
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|f| f.set_len(d.size))
                .map_err(|e| {
                    fatal(format!(
                        "vma: create vmstate file '{}' failed - {}",
                        path.display(),
                        errstr(&e)
                    ))
                })?;
            let mut s = TargetSpec::new(&path.to_string_lossy());
            s.format = Some("raw".into());
            s.zeros = Zeros::Skip;
            s.space_check = false;
            s
        } else {
            if let Some(only) = &only {
                if !only.contains(&d.name) {
                    continue;
                }
            }
            match &map {
                Some(map) => {
                    let entry = map.iter().rev().find(|m| match m {
                        MapLine::Skip(n) | MapLine::Target(n, _, _) => *n == d.name,
                    });
                    match entry {
                        None => {
                            return Err(fatal(format!(
                                "vma: no device name mapping for {}",
                                d.name
                            )))
                        }
                        Some(MapLine::Skip(_)) => continue,
                        Some(MapLine::Target(_, spec, cache)) => {
                            let mut spec = spec.clone();
                            spec.cache = cache_mode(cache)?;
                            spec
                        }
                    }
                }
                None => {
                    let tmp = dir.join(format!("tmp-disk-{}.raw", d.name));
                    devinfo += &format!("DEVINFO {} {}\n", tmp.display(), d.size);
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&tmp)
                        .and_then(|f| f.set_len(d.size))
                        .map_err(|e| {
                            fatal(format!("vma: can't create file {}: {e}", tmp.display()))
                        })?;
                    renames.push((tmp.clone(), dir.join(format!("disk-{}.raw", d.name))));
                    let mut s = TargetSpec::new(&tmp.to_string_lossy());
                    s.format = Some("raw".into());
                    s.zeros = Zeros::Skip;
                    s.space_check = false;
                    s
                }
            }
        };
        let target =
            Target::open(&spec, &d.name, d.size, None, &mut groups).map_err(|e| match e
                .downcast_ref::<SizeMismatch>()
            {
                Some(m) => fatal(format!(
                    "vma: vma_reader_register_bs for stream {} failed - unexpected size {} != {}",
                    m.drive, m.target, m.drive_size
                )),
                None => fatal(format!(
                    "vma: can't open file {} - {}",
                    spec.path,
                    crate::one_line(&e)
                )),
            })?;
        targets[d.id.0 as usize] = Some(target);
    }
    if !devinfo.is_empty() {
        out(&devinfo)?;
    }
    let mut lines = ProgressLines {
        total_clusters: header
            .drives
            .iter()
            .filter(|d| d.name != "vmstate")
            .map(|d| d.size / 65536)
            .sum(),
        last: 0,
        start: Instant::now(),
        verbose,
    };
    let restored = targets::restore(stream, &mut targets, 0, false, |c| lines.tick(c))
        .map_err(|e| restore_failed("restore", e))?;
    lines.summary(&restored.counts)?;
    for (from, to) in renames {
        std::fs::rename(&from, &to).map_err(|e| {
            fatal(format!(
                "vma: rename {} to {} failed - {}",
                from.display(),
                to.display(),
                errstr(&e)
            ))
        })?;
    }
    Ok(())
}

/// Whether `create -v` in Proxmox's grammar runs: [`tally`] then counts.
static CREATE_VERBOSE: AtomicBool = AtomicBool::new(false);

/// The per-drive `(name, size, zero bytes)` of the last archive [`tally`] saw.
static CREATE_IMAGES: Mutex<Vec<(String, u64, u64)>> = Mutex::new(Vec::new());

/// What Proxmox's `vma create -v` counts per drive: bytes transferred and
/// zero bytes (the bytes of every all-zero 4 KiB block; a drive's last
/// cluster counts only up to the drive's end, so `zeros` never exceeds
/// `size`).
struct DriveTally {
    id: DriveId,
    name: String,
    size: u64,
    transferred: u64,
    zeros: u64,
}

/// A [`ClusterObserver`] of `create`'s writer that, for Proxmox's `create
/// -v`, prints its `progress P% DONE/TOTAL ZEROS` lines on standard error
/// and keeps the per-drive counts for the `image` lines.
pub(crate) struct Tally {
    drives: Option<(Vec<DriveTally>, i64)>,
}

/// A tally of `drives` (the drives of `create`); it counts only in
/// Proxmox's `create -v`.
pub(crate) fn tally(drives: &[DriveInfo]) -> Tally {
    let drives = CREATE_VERBOSE.load(Ordering::Relaxed).then(|| {
        let t = drives
            .iter()
            .map(|d| DriveTally {
                id: d.id,
                name: d.name.clone(),
                size: d.size,
                transferred: 0,
                zeros: 0,
            })
            .collect();
        (t, -1)
    });
    let mut t = Tally { drives };
    t.progress();
    t
}

impl Tally {
    /// Count `clusters` from `first` on: all zero, or with `zeros` zero bytes.
    fn add(&mut self, drive: DriveId, first: u64, clusters: u64, zeros: Option<u64>) {
        if let Some((drives, _)) = &mut self.drives {
            if let Some(d) = drives.iter_mut().find(|d| d.id == drive) {
                let end = ((first + clusters) * 65536).min(d.size);
                let bytes = end.saturating_sub(first * 65536);
                d.transferred += bytes;
                d.zeros += zeros.unwrap_or(bytes);
            }
            self.progress();
        }
    }

    fn progress(&mut self) {
        let Some((drives, last)) = &mut self.drives else {
            return;
        };
        let total: u64 = drives.iter().map(|d| d.size).sum();
        let done: u64 = drives.iter().map(|d| d.transferred).sum();
        let zeros: u64 = drives.iter().map(|d| d.zeros).sum();
        let percent = (done * 100).checked_div(total).unwrap_or(100) as i64;
        if percent != *last {
            *last = percent;
            eprintln!("progress {percent}% {done}/{total} {zeros}");
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if let Some((drives, _)) = &self.drives {
            if let Ok(mut images) = CREATE_IMAGES.lock() {
                *images = drives
                    .iter()
                    .map(|d| (d.name.clone(), d.size, d.zeros))
                    .collect();
            }
        }
    }
}

impl ClusterObserver for Tally {
    fn cluster(&mut self, drive: DriveId, cluster: ClusterNo, data: &[u8]) {
        if self.drives.is_some() {
            let zeros = data
                .chunks(4096)
                .filter(|b| b.iter().all(|&x| x == 0))
                .map(|b| b.len() as u64)
                .sum();
            self.add(drive, cluster.0, 1, Some(zeros));
        }
    }

    fn zeros(&mut self, drive: DriveId, clusters: Range<u64>) {
        let n = clusters.end.saturating_sub(clusters.start);
        self.add(drive, clusters.start, n, None);
    }
}

/// The `image DEV: size=N zeros=N saved=N` lines of Proxmox's `create -v`.
fn print_images() {
    let images = CREATE_IMAGES.lock().map(|i| i.clone()).unwrap_or_default();
    for (name, size, zeros) in images.iter().filter(|i| i.1 != 0) {
        eprintln!(
            "image {name}: size={size} zeros={zeros} saved={}",
            *size as i64 - *zeros as i64
        );
    }
}

fn create(operands: &[String], opts: &Opts) -> Result<(), Fatal> {
    let verbose = flag(opts, 'v');
    let archive = &operands[0];
    let devices: Vec<&String> = opts
        .iter()
        .filter(|(c, _)| *c == 'd')
        .filter_map(|(_, v)| v.as_ref())
        .collect();
    let mut images = Vec::new();
    if !devices.is_empty() && operands.len() > 1 {
        return Err(fatal(
            "vma: Unexpected extra argument - specify all devices via '-d'",
        ));
    }
    for (n, d) in devices.iter().enumerate() {
        let Some(rest) = d.strip_prefix("format=") else {
            return Err(fatal(format!("vma: No format specified for device: '{d}'")));
        };
        let Some((fmt, target)) = rest.split_once(':') else {
            return Err(fatal(format!("vma: No format specified for device: '{d}'")));
        };
        let target = if target.contains('=') {
            target.to_owned()
        } else {
            format!("disk{n}={target}")
        };
        images.push(format!("format={fmt}:{target}"));
    }
    for legacy in &operands[1..] {
        eprintln!("vma: warning: Specifying a device without a format is deprecated - use '-d format=<format>:{legacy}'");
        images.push(legacy.clone());
    }
    let mut argv: Vec<String> = vec![
        "vma".into(),
        "create".into(),
        "--format".into(),
        "vma1".into(),
    ];
    // Proxmox's `-v` lines come from [`tally`] instead of our progress bar and summary.
    argv.push("--quiet".into());
    CREATE_VERBOSE.store(verbose && !images.is_empty(), Ordering::Relaxed);
    for (_, c) in opts.iter().filter(|(c, _)| *c == 'c') {
        let c = c.clone().unwrap_or_default();
        let name = Path::new(&c)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        argv.push("--config".into());
        argv.push(format!("{name}={c}"));
    }
    let exec = archive.strip_prefix("exec:");
    argv.push(if exec.is_some() {
        "-".into()
    } else {
        archive.clone()
    });
    argv.push("--".into());
    argv.extend(images);
    let cli = match <crate::Cli as clap::Parser>::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => return Err(fatal(format!("vma: {e}"))),
    };
    let Some(cmd) = exec else {
        let result = crate::run(cli);
        print_images();
        return result.map_err(|e| {
            fatal(format!(
                "vma: creating vma archive failed: {}",
                crate::one_line(&e)
            ))
        });
    };
    // `exec:CMD`: the archive goes to the standard input of `sh -c CMD`,
    // which inherits our standard output.
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fatal(format!("vma: can't popen command '{cmd}' - {}", errstr(&e))))?;
    let pipe = child.stdin.take().expect("piped");
    use std::os::unix::io::AsRawFd;
    let _ = std::io::stdout().flush();
    // SAFETY: dup/dup2 on descriptors we own; fd 1 is restored below.
    let saved = unsafe { libc::dup(1) };
    unsafe { libc::dup2(pipe.as_raw_fd(), 1) };
    drop(pipe);
    let result = crate::run(cli);
    let _ = std::io::stdout().flush();
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    let _ = child.wait();
    print_images();
    result.map_err(|e| {
        fatal(format!(
            "vma: creating vma archive failed: {}",
            crate::one_line(&e)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_like_c_printf_g3() {
        for (v, s) in [
            (93.12, "93.1"),
            (0.0, "0"),
            (100.0, "100"),
            (0.0103, "0.0103"),
            (1e-5, "1e-05"),
            (5.6e-6, "5.6e-06"),
            (99.96, "100"),
            (64.2456, "64.2"),
        ] {
            assert_eq!(g3(v), s, "{v}");
        }
    }

    #[test]
    fn getopt_permutes_and_clusters() {
        let args: Vec<String> = ["FILE", "-vrF", "--", "-x"].map(String::from).to_vec();
        let (opts, ops) = getopt("extract", "hvd:r:", &args).unwrap();
        assert_eq!(opts, vec![('v', None), ('r', Some("F".into()))]);
        assert_eq!(ops, ["FILE", "-x"]);
        let args: Vec<String> = ["-", "-c"].map(String::from).to_vec();
        assert_eq!(
            getopt("config", "hc:", &args).unwrap_err(),
            "config: option requires an argument -- 'c'"
        );
        assert!(looks_proxmox(
            "config",
            "hc:",
            &["F".into(), "-c".into(), "x".into()]
        ));
        assert!(!looks_proxmox("config", "hc:", &["F".into()]));
        assert!(!looks_proxmox(
            "extract",
            "hvd:r:",
            &["-v".into(), "F".into(), "D".into()]
        ));
        assert!(!looks_proxmox(
            "extract",
            "hvd:r:",
            &["F".into(), "--drive".into(), "x".into()]
        ));
        assert!(looks_proxmox("create", "hvc:d:", &["exec:cat".into()]));
    }

    #[test]
    fn map_lines() {
        let MapLine::Target(dev, spec, cache) =
            parse_map_line("throttling.bps=010:cache=none:format=qcow2:1:drive-scsi0=/a=b:c")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(dev, "drive-scsi0");
        assert_eq!(spec.path, "/a=b:c");
        assert_eq!(spec.bps, Some(8));
        assert_eq!(spec.format.as_deref(), Some("qcow2"));
        assert_eq!(spec.zeros, Zeros::Establish);
        assert_eq!(cache.as_deref(), Some("none"));
        assert!(matches!(parse_map_line("skip=x"), Ok(MapLine::Skip(n)) if n == "x"));
        assert_eq!(
            parse_map_line("done").err().unwrap(),
            "parse error ('done')"
        );
    }
}

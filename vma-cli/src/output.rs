//! Human and JSON output of `list` and `verify`, and progress bars.

use std::path::{Path, PathBuf};

use vma_core::chain::configs::{
    point_configs, point_configs_over, stores_vm_configs, PointConfigs,
};
use vma_core::chain::Chain;
use vma_core::Reader;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use vma_core::format::Header;
use vma_core::ops::report::{cannot_prove, format_names, ListDocument, VerifyDocument};
use vma_core::read::damage::DamageReport;
use vma_core::read::stream::DriveDigestCheck;
use vma_core::util::human_bytes;

use crate::{open_for_listing, open_stream, progress_wanted, Damage, Opened};
use vma_core::read::detect::StreamCompression;
use vma_core::read::stream::ArchiveFormat;

/// What a failed `verify` says (after the archive's name); the next step
/// it gets is salvage (see `hints`).
pub(crate) const VERIFY_FAILED: &str = "verification failed";

/// A byte progress bar on stderr, drawn only for a terminal and without `--quiet`.
pub(crate) struct Progress(Option<ProgressBar>);

/// `-v`: progress as lines when stderr is not a terminal.
static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set by `-v/--verbose`.
pub(crate) fn set_verbose(verbose: bool) {
    VERBOSE.store(verbose, std::sync::atomic::Ordering::Relaxed);
}

/// A bar that is not drawn; a thread prints a line on stderr at every
/// tenth of the work (every 10 s while the total is unknown) until it is
/// finished.
fn line_progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::hidden());
    bar.set_message(what.to_string());
    let ticker = bar.clone();
    let _ = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let (mut last, mut waited) = (0u64, 0u32);
            while !ticker.is_finished() {
                std::thread::sleep(std::time::Duration::from_millis(25));
                waited += 1;
                let (pos, len) = (ticker.position(), ticker.length().unwrap_or(0));
                if let Some(tenth) = (pos.min(len) * 10).checked_div(len) {
                    if tenth > last {
                        last = tenth;
                        eprintln!(
                            "vma: {} {}% ({} of {})",
                            ticker.message(),
                            tenth * 10,
                            human_bytes(pos),
                            human_bytes(len)
                        );
                    }
                } else if waited % 400 == 0 {
                    eprintln!("vma: {} {} done", ticker.message(), human_bytes(pos));
                }
            }
        });
    bar
}

impl Progress {
    pub(crate) fn bytes(total: u64, what: &str, quiet: bool) -> Progress {
        if !progress_wanted(quiet) {
            if !quiet && VERBOSE.load(std::sync::atomic::Ordering::Relaxed) {
                return Progress(Some(line_progress(total, what)));
            }
            return Progress(None);
        }
        let bar = if total > 0 {
            ProgressBar::new(total)
        } else {
            ProgressBar::new_spinner()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress(Some(bar))
    }

    pub(crate) fn set(&self, pos: u64) {
        if let Some(b) = &self.0 {
            b.set_position(pos);
        }
    }

    /// Change the total (for work whose size grows as it runs).
    pub(crate) fn set_total(&self, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }

    /// A progress callback for library passes: the step's name becomes the
    /// bar's message; a non-zero total replaces the bar's length.
    pub(crate) fn callback(&self) -> Option<vma_core::util::ProgressFn> {
        let bar = self.0.clone()?;
        Some(std::sync::Arc::new(
            move |what: &str, done: u64, total: u64| show_step(&bar, what, done, total),
        ))
    }
}

/// The step's name becomes the bar's message; a non-zero total replaces
/// the bar's length.
fn show_step(bar: &ProgressBar, what: &str, done: u64, total: u64) {
    if bar.message() != what {
        bar.set_message(what.to_string());
    }
    if total > 0 && bar.length() != Some(total) {
        bar.set_length(total);
    }
    bar.set_position(done);
}

use vma_core::types::uuid_text as uuid_str;

/// The `list --json` document (also what `mount` will show as archive.json)
/// of `opened`, read through `reader` when it is a complete file, with the
/// configs of its point in time (`configs`).
pub(crate) fn list_json(
    opened: &Opened,
    reader: Option<&Reader>,
    configs: &PointConfigs,
) -> ListDocument {
    ListDocument::new(
        &opened.header,
        opened.format,
        opened.compression,
        reader,
        opened.problem.clone(),
        configs,
    )
}

/// The configs of the point in time of an archive with `header` (read
/// from `path` unless standard input): an incremental archive that stores
/// no VM configs takes them from its ancestors, found as `extract` finds
/// them. When they cannot be found, only what the archive stores, and why.
pub(crate) fn listed_configs(
    header: &Header,
    path: Option<&Path>,
    parents: &[PathBuf],
) -> (PointConfigs, Option<String>) {
    if header.parent.is_none() || stores_vm_configs(header) {
        return (point_configs(header, &[]), None);
    }
    match Chain::open_parent(header, path, parents) {
        Ok(chain) => (point_configs_over(header, chain.as_ref()), None),
        Err(e) => (
            point_configs(header, &[]),
            Some(format!(
                "the archive stores no VM config and its ancestors could not be opened ({e}); give them with --parent"
            )),
        ),
    }
}

pub(crate) fn list(archive: &str, json_out: bool, chain: bool, parents: &[PathBuf]) -> Result<()> {
    let opened = open_for_listing(archive)?;
    let path = (archive != "-").then(|| Path::new(archive));
    let (configs, configs_problem) = listed_configs(&opened.header, path, parents);
    let mut doc = list_json(&opened, opened.reader.as_ref(), &configs);
    doc.configs_problem = configs_problem;
    if chain {
        if archive == "-" {
            anyhow::bail!("--chain needs an archive file, not standard input");
        }
        let chain = Chain::open(Path::new(archive), parents)?;
        doc.chain = Some(ListDocument::chain_links(chain.links()));
    }
    let doc = serde_json::to_value(&doc)?;
    if json_out {
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        outln!(
            "format:      {} {}",
            doc["format"].as_str().unwrap_or("?"),
            doc["version"].as_str().unwrap_or("?")
        );
        outln!("uuid:        {}", doc["uuid"].as_str().unwrap_or("?"));
        outln!(
            "created:     {} ({})",
            doc["ctime_utc"].as_str().unwrap_or("?"),
            doc["ctime"]
        );
        outln!(
            "creator:     {}",
            doc["creator"]
                .as_str()
                .unwrap_or("(not recorded: VMA v1 has no creator field)")
        );
        if let Some(p) = doc["parent"]["uuid"].as_str() {
            outln!("parent:      {p}");
        }
        for s in doc["stands_for"].as_array().into_iter().flatten() {
            outln!(
                "stands for:  {} (a synthetic full of its point in time)",
                s["uuid"].as_str().unwrap_or("?")
            );
        }
        outln!(
            "compression: {}",
            doc["compression"].as_str().unwrap_or("?")
        );
        if let Some(size) = doc["archive_size"].as_u64() {
            outln!("archive:     {} bytes ({})", size, human_bytes(size));
        }
        outln!("drives:");
        for d in doc["drives"].as_array().into_iter().flatten() {
            let size = d["size"].as_u64().unwrap_or(0);
            let stored = d["stored_bytes"]
                .as_u64()
                .map_or("stored ?".to_string(), |s| {
                    format!("stored {}", human_bytes(s))
                });
            outln!(
                "  {:>3}  {:<24} {:>16} bytes ({}), {}",
                d["id"],
                d["name"].as_str().unwrap_or(""),
                size,
                human_bytes(size),
                stored
            );
        }
        outln!("configs:");
        for c in doc["configs"].as_array().into_iter().flatten() {
            let from = match (c["source_uuid"].as_str(), c["source_path"].as_str()) {
                (Some(uuid), Some(path)) => format!("  from ancestor {uuid} ({path})"),
                _ => String::new(),
            };
            outln!(
                "       {:<24} {:>8} bytes{from}",
                c["name"].as_str().unwrap_or(""),
                c["size"]
            );
        }
        if let Some(problem) = doc["configs_problem"].as_str() {
            outln!("       ({problem})");
        }
        if let Some(links) = doc["chain"].as_array() {
            outln!("chain (newest first):");
            for l in links {
                outln!(
                    "       {}  {}  {}{}{}  {}",
                    l["uuid"].as_str().unwrap_or(""),
                    l["ctime_utc"].as_str().unwrap_or(""),
                    if l["incremental"] == true {
                        "incremental"
                    } else {
                        "full"
                    },
                    if l["interrupted"] == true {
                        " (interrupted)"
                    } else {
                        ""
                    },
                    l["stands_in_for"]
                        .as_str()
                        .map(|u| format!(" (stands in for {u})"))
                        .unwrap_or_default(),
                    l["path"].as_str().unwrap_or("")
                );
            }
        }
    }
    if !json_out {
        for note in cannot_prove(opened.format) {
            outln!(
                "note:        version {} cannot prove this: {note}",
                doc["version"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(why) = &opened.problem {
        eprintln!("vma: warning: {why}");
        eprintln!(
            "vma: next step: `vma verify {archive}` lists every lost range; `vma extract --salvage {archive} DIR` recovers what is intact"
        );
    }
    Ok(())
}

/// Print a damage report as lines on stderr: each problem, then each lost
/// range with what became of it (`fate`, e.g. "written as zeros").
pub(crate) fn print_damage_text(report: &DamageReport, fate: &str) {
    for line in report.lines(fate) {
        eprintln!("vma: {line}");
    }
}

pub(crate) fn verify(
    archive: &str,
    json_out: bool,
    threads: usize,
    drive_digests: bool,
    parents: &[PathBuf],
    quiet: bool,
) -> Result<()> {
    let (stream, path, compression) = open_stream(archive)?;
    let format = stream.format();
    // An incremental archive is checked with its ancestors: each link must
    // be found (proven by content) and intact, and the drive digests of the
    // point in time are checked with their leaves.
    // A link that cannot be found or proven fails the verification (exit
    // 1): the point in time cannot be verified without it.
    let ancestors = Chain::open_parent(stream.header(), path.as_deref(), parents)
        .map_err(|e| {
            Damage(format!(
                "{archive}: its point in time cannot be verified: {e}"
            ))
        })?
        .map(std::sync::Arc::new);
    let path = path.filter(|_| compression == StreamCompression::None);
    let total = path
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let progress = crate::output::Progress::bytes(total, "verify", quiet || json_out);
    let options = vma_core::ops::verify::VerifyOptions {
        threads,
        drive_digests,
        progress: progress.callback(),
    };
    let report = vma_core::ops::verify::verify_with(
        stream,
        &options,
        path.as_deref().map(Path::new),
        ancestors.as_ref(),
    )?;
    progress.finish();
    let mut links = Vec::new();
    for link in ancestors.iter().flat_map(|c| c.links()) {
        let link_path = link.path().display().to_string();
        let (stream, _, _) = open_stream(&link_path)?;
        // The link's own ancestors are the chain below it.
        let below =
            Chain::open_parent(link.header(), Some(link.path()), parents)?.map(std::sync::Arc::new);
        let progress = crate::output::Progress::bytes(0, "verify ancestor", quiet || json_out);
        let options = vma_core::ops::verify::VerifyOptions {
            progress: progress.callback(),
            ..options.clone()
        };
        let link_report = vma_core::ops::verify::verify_with(
            stream,
            &options,
            Some(link.path()),
            below.as_ref(),
        )?;
        progress.finish();
        links.push((link_path, link_report));
    }
    let chain_ok = links.iter().all(|(_, r)| r.is_clean());
    let header = &report.header;
    if json_out {
        let doc = VerifyDocument::new(&report, &links);
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for p in &report.problems {
            outln!("DAMAGED: {p}");
        }
        if !quiet || !report.is_clean() {
            let (name, version) = format_names(format, header);
            outln!(
                "archive {} ({name} {version}, uuid {}): {} extents, {} read",
                archive,
                uuid_str(&header.uuid),
                report.extents,
                human_bytes(report.bytes)
            );
            if format == ArchiveFormat::VmaV1 {
                outln!(
                    "  note: VMA v1 carries no checksums over the data; checked were the header and extent-header MD5s, the structure and that every cluster is present exactly once"
                );
            }
            for note in cannot_prove(format) {
                if format != ArchiveFormat::VmaV1 {
                    outln!("  note: version {version} cannot prove this: {note}");
                }
            }
            let kind = if format == ArchiveFormat::V3 {
                "drive digest"
            } else {
                "whole-drive sha256"
            };
            for (d, c) in header.drives.iter().zip(&report.digests) {
                let detail = match c {
                    DriveDigestCheck::Match(x) => format!("{kind} {} matches", hex::encode(x)),
                    DriveDigestCheck::Mismatch { .. } => format!("{kind} MISMATCH"),
                    DriveDigestCheck::NotRecorded if format == ArchiveFormat::VmaV1 => {
                        "no checksum of the data exists in VMA v1".into()
                    }
                    DriveDigestCheck::NotRecorded if format == ArchiveFormat::V3 => {
                        "no drive digest (an interrupted capture: no point in time)".into()
                    }
                    DriveDigestCheck::NotRecorded => {
                        "no whole-drive sha256 recorded (extent digests checked)".into()
                    }
                    DriveDigestCheck::OutOfOrder => {
                        "stored out of order; whole-drive sha256 not checked from a pipe".into()
                    }
                    DriveDigestCheck::NotChecked => format!("{kind} not checked (damage)"),
                    DriveDigestCheck::Skipped => format!("{kind} skipped"),
                };
                outln!("  drive {} ({}): {}", d.name, human_bytes(d.size), detail);
            }
            for (p, r) in &links {
                for problem in &r.problems {
                    outln!("DAMAGED: ancestor {p}: {problem}");
                }
                outln!(
                    "  ancestor {} ({p}): {}",
                    uuid_str(&r.header.uuid),
                    if r.is_clean() { "intact" } else { "DAMAGED" }
                );
            }
            if report.is_clean() && chain_ok {
                outln!("OK: archive is intact");
            } else {
                outln!("FAILED: {} problem(s) found", report.problems.len());
            }
        }
    }
    if !chain_ok {
        return Err(Damage(format!("{archive}: an ancestor archive is damaged")).into());
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(Damage(format!(
            "{archive}: {VERIFY_FAILED} with {} problem(s)",
            report.problems.len()
        ))
        .into())
    }
}

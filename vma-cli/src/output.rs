//! Human and JSON output of `list` and `verify`, and progress bars.

use std::path::{Path, PathBuf};

use vma_core::chain::Chain;
use vma_core::configs::{
    point_configs, point_configs_over, stores_vm_configs, ConfigSource, PointConfigs,
};
use vma_core::Reader;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use vma_core::format::{Codec, Header};
use vma_core::stream::{human_bytes, DriveDigestCheck};
use vma_core::types::DriveRange;
use vma_core::Error;

use crate::{open_for_listing, open_stream, progress_wanted, Damage, Opened};
use vma_core::detect::StreamCompression;
use vma_core::stream::ArchiveFormat;

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

    /// Show step `what` at `done` of `total` bytes.
    pub(crate) fn step(&self, what: &str, done: u64, total: u64) {
        if let Some(bar) = &self.0 {
            show_step(bar, what, done, total);
        }
    }

    /// A progress callback for library passes: the step's name becomes the
    /// bar's message; a non-zero total replaces the bar's length.
    pub(crate) fn callback(&self) -> Option<vma_core::stream::ProgressFn> {
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

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn iso_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn compression_str(h: &Header) -> String {
    match h.compression.codec {
        Codec::None => "none".into(),
        Codec::Zstd => format!("zstd:{}", h.compression.level),
    }
}

/// `format` and `version` values of the JSON documents.
fn format_names(format: ArchiveFormat, header: &Header) -> (&'static str, String) {
    match format {
        ArchiveFormat::V3 | ArchiveFormat::V2 => (
            "vma",
            format!("{}.{}", header.version_major, header.version_minor),
        ),
        ArchiveFormat::VmaV1 => ("proxmox-vma", "1".to_string()),
    }
}

/// The `list --json` document (also what `mount` will show as archive.json)
/// of `opened`, read through `reader` when it is a complete file, with the
/// configs of its point in time (`configs`).
pub(crate) fn list_json(opened: &Opened, reader: Option<&Reader>, configs: &PointConfigs) -> Value {
    let header = &opened.header;
    let drives: Vec<Value> = header
        .drives
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let rec = reader.and_then(|r| r.drive_records().get(i).copied());
            let v3 = opened.format == ArchiveFormat::V3;
            json!({
                "id": d.id.0,
                "name": d.name,
                "size": d.size,
                "stored_bytes": rec.map(|r| r.stored_bytes),
                "data_clusters": rec.map(|r| r.data_clusters),
                "digest": rec.and_then(|r| r.digest).map(hex::encode),
                "digest_kind": digest_kind(opened.format),
                "sha256": rec.and_then(|r| r.digest).filter(|_| !v3).map(hex::encode),
            })
        })
        .collect();
    let configs: Vec<Value> = configs
        .configs
        .iter()
        .map(|(c, source)| {
            let (kind, uuid, path) = match source {
                ConfigSource::Archive => ("archive", None, None),
                ConfigSource::Ancestor { uuid, path } => (
                    "ancestor",
                    Some(uuid_str(uuid)),
                    Some(path.display().to_string()),
                ),
            };
            json!({
                "name": c.name,
                "size": c.data.len(),
                "source": kind,
                "source_uuid": uuid,
                "source_path": path,
            })
        })
        .collect();
    let (format, version) = format_names(opened.format, header);
    let compression = match (opened.format, opened.compression) {
        (_, StreamCompression::Zstd) => "zstd (whole stream)".to_string(),
        (_, StreamCompression::Gzip) => "gzip (whole stream)".to_string(),
        (_, StreamCompression::Lzo) => "lzo (whole stream)".to_string(),
        (ArchiveFormat::VmaV1, StreamCompression::None) => "none".to_string(),
        (_, StreamCompression::None) => compression_str(header),
    };
    json!({
        "format": format,
        "version": version,
        "uuid": uuid_str(&header.uuid),
        "ctime": header.ctime,
        "ctime_utc": iso_time(header.ctime),
        // VMA v1 has no creator field.
        "creator": (opened.format != ArchiveFormat::VmaV1).then_some(&header.creator),
        "compression": compression,
        "parent": header.parent.map(|p| json!({"uuid": uuid_str(&p.uuid), "digest": hex::encode(p.digest)})),
        "stands_for": header.stands_for.iter().map(|p| json!({"uuid": uuid_str(&p.uuid), "digest": hex::encode(p.digest)})).collect::<Vec<_>>(),
        // Known only when the archive was opened as a file (its index and
        // footer read); a compressed stream or standard input is read by
        // `vma verify` in one pass.
        "complete": if reader.is_some() { json!(true) } else if opened.problem.is_some() { json!(false) } else { Value::Null },
        "problem": opened.problem,
        "archive_size": reader.and_then(|r| std::fs::metadata(r.path()).ok()).map(|m| m.len()),
        "archive_digest": reader.and_then(|r| r.archive_digest()).map(hex::encode),
        "state_digest": reader.and_then(|r| r.state_digest()).map(hex::encode),
        "cannot_prove": cannot_prove(opened.format),
        "drives": drives,
        "configs": configs,
        "configs_problem": null,
    })
}

/// What the drive digests of `format` are.
fn digest_kind(format: ArchiveFormat) -> Option<&'static str> {
    match format {
        ArchiveFormat::V3 => Some("vma-tree"),
        ArchiveFormat::V2 => Some("sha256"),
        ArchiveFormat::VmaV1 => None,
    }
}

/// What an archive of `format` cannot prove (the format's limits, listed
/// by `list` and `verify`).
fn cannot_prove(format: ArchiveFormat) -> Vec<&'static str> {
    match format {
        ArchiveFormat::V3 => Vec::new(),
        ArchiveFormat::V2 => vec![
            "extents are not bound to their archive or position (a spliced or overwritten file is found by verify, not by random access)",
            "chain links are accepted on the uuid and digest an ancestor's own footer states",
            "the drive digest is one plain SHA-256 per drive, linear in the drive size and recorded only for drives written in order",
        ],
        ArchiveFormat::VmaV1 => vec!["VMA v1 carries no checksums over the data"],
    }
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
    if let Some(problem) = configs_problem {
        doc["configs_problem"] = json!(problem);
    }
    if chain {
        if archive == "-" {
            anyhow::bail!("--chain needs an archive file, not standard input");
        }
        let chain = Chain::open(Path::new(archive), parents)?;
        let links = chain.links();
        doc["chain"] = links
            .iter()
            .enumerate()
            .map(|(i, r)| {
                // A link found as a stand-in for the parent its child names.
                let wanted = i
                    .checked_sub(1)
                    .and_then(|c| links[c].header().parent)
                    .filter(|p| p.uuid != r.header().uuid);
                json!({
                    "path": r.path().display().to_string(),
                    "uuid": uuid_str(&r.header().uuid),
                    "ctime": r.header().ctime,
                    "ctime_utc": iso_time(r.header().ctime),
                    "incremental": r.header().parent.is_some(),
                    "interrupted": r.drive_records().iter().any(|d| d.interrupted),
                    "stands_in_for": wanted.map(|p| uuid_str(&p.uuid)),
                })
            })
            .collect();
    }
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

fn range_json(r: &DriveRange) -> Value {
    json!({"drive": r.drive_name, "drive_id": r.drive.0, "start": r.bytes.start, "end": r.bytes.end})
}

fn problem_json(e: &Error) -> Value {
    let (kind, offset, ranges): (&str, Option<u64>, Vec<Value>) = match e {
        Error::Corrupt { offset, .. } => ("corrupt", Some(*offset), vec![]),
        Error::Truncated { offset, .. } => ("truncated", Some(*offset), vec![]),
        Error::ExtentDamaged { offset, ranges, .. } => (
            "extent-damaged",
            Some(*offset),
            ranges.iter().map(range_json).collect(),
        ),
        Error::Incomplete { ranges, .. } => {
            ("incomplete", None, ranges.iter().map(range_json).collect())
        }
        Error::DriveDigestMismatch { .. } => ("drive-digest-mismatch", None, vec![]),
        Error::Conflicting { ranges, .. } => {
            ("conflicting", None, ranges.iter().map(range_json).collect())
        }
        Error::Duplicate { ranges, .. } => {
            ("duplicate", None, ranges.iter().map(range_json).collect())
        }
        _ => ("other", None, vec![]),
    };
    json!({"kind": kind, "offset": offset, "message": e.to_string(), "ranges": ranges})
}

/// The report of what a salvage lost (`extract --salvage`, `mount
/// --salvage`): `ok`, `problems`, `damaged`, `missing`, and `lost`: every
/// range written or read as zeros, sorted by drive and offset (`lost`
/// given, or the damaged and missing ranges together).
pub(crate) fn damage_json(
    problems: &[Error],
    damaged: &[DriveRange],
    missing: &[DriveRange],
    conflicting: &[DriveRange],
    lost: Option<&[DriveRange]>,
) -> Value {
    let mut all: Vec<&DriveRange> = match lost {
        Some(l) => l.iter().collect(),
        None => damaged.iter().chain(missing).chain(conflicting).collect(),
    };
    all.sort_by_key(|r| (r.drive, r.bytes.start));
    let lost_bytes: u64 = all.iter().map(|r| r.bytes.end - r.bytes.start).sum();
    json!({
        "ok": problems.is_empty() && all.is_empty(),
        "problems": problems.iter().map(problem_json).collect::<Vec<_>>(),
        "damaged": damaged.iter().map(range_json).collect::<Vec<_>>(),
        "missing": missing.iter().map(range_json).collect::<Vec<_>>(),
        "conflicting": conflicting.iter().map(range_json).collect::<Vec<_>>(),
        "lost": all.iter().map(|r| range_json(r)).collect::<Vec<_>>(),
        "lost_bytes": lost_bytes,
    })
}

/// A [`damage_json`] report as lines on stderr: each problem, then each
/// lost range with what became of it (`fate`, e.g. "written as zeros").
pub(crate) fn print_damage_text(report: &Value, fate: &str) {
    let list = |key: &str| report[key].as_array().cloned().unwrap_or_default();
    for p in list("problems") {
        eprintln!("vma: damaged: {}", p["message"].as_str().unwrap_or("?"));
    }
    for r in list("lost") {
        eprintln!(
            "vma: lost ({fate}): drive {} ({}) bytes {}..{}",
            r["drive"].as_str().unwrap_or("?"),
            r["drive_id"],
            r["start"],
            r["end"]
        );
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
    let options = vma_core::verify::VerifyOptions {
        threads,
        drive_digests,
        progress: progress.callback(),
    };
    let report = vma_core::verify::verify_with(
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
        let options = vma_core::verify::VerifyOptions {
            progress: progress.callback(),
            ..options.clone()
        };
        let link_report =
            vma_core::verify::verify_with(stream, &options, Some(link.path()), below.as_ref())?;
        progress.finish();
        links.push((link_path, link_report));
    }
    let chain_ok = links.iter().all(|(_, r)| r.is_clean());
    let header = &report.header;
    let digest_word = |c: &DriveDigestCheck| match c {
        DriveDigestCheck::Match(_) => "match",
        DriveDigestCheck::Mismatch { .. } => "mismatch",
        DriveDigestCheck::NotRecorded => "not-recorded",
        DriveDigestCheck::OutOfOrder => "out-of-order",
        DriveDigestCheck::NotChecked => "not-checked",
        DriveDigestCheck::Skipped => "skipped",
    };
    if json_out {
        let drives: Vec<Value> = header
            .drives
            .iter()
            .zip(&report.digests)
            .map(|(d, c)| {
                let v3 = format == ArchiveFormat::V3;
                let digest = match c {
                    DriveDigestCheck::Match(x) => Some(hex::encode(x)),
                    _ => None,
                };
                json!({
                    "id": d.id.0, "name": d.name, "size": d.size,
                    "digest_check": digest_word(c),
                    "digest": digest,
                    "digest_kind": digest_kind(format),
                    "sha256_check": if v3 { "not-recorded" } else { digest_word(c) },
                    "sha256": if v3 { None } else { digest },
                })
            })
            .collect();
        let doc = json!({
            "ok": report.is_clean(),
            "format": format_names(format, header).0,
            "version": format_names(format, header).1,
            "data_checksums": format.is_native(),
            "cannot_prove": cannot_prove(format),
            "uuid": uuid_str(&header.uuid),
            "extents": report.extents,
            "bytes": report.bytes,
            "drives": drives,
            "problems": report.problems.iter().map(problem_json).collect::<Vec<_>>(),
            "damaged": report.damaged.iter().map(range_json).collect::<Vec<_>>(),
            "missing": report.missing.iter().map(range_json).collect::<Vec<_>>(),
            "conflicting": report.conflicting.iter().map(range_json).collect::<Vec<_>>(),
            "chain": links.iter().map(|(p, r)| json!({
                "path": p,
                "uuid": uuid_str(&r.header.uuid),
                "ok": r.is_clean(),
                "problems": r.problems.iter().map(problem_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
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

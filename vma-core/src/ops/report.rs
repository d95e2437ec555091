//! The documents of `list --json`, `verify --json` and `extract --json`
//! (and the mount's `archive.json`): built here from what the readers found, serialised
//! as they are by the CLI. README.md ("JSON output") lists every key.

use serde::Serialize;

use crate::chain::configs::{ConfigSource, PointConfigs};
use crate::format::{Codec, Header, ParentRef};
use crate::ops::extract::ExtractSummary;
use crate::read::damage::{DamageReport, ProblemReport, RangeReport};
use crate::read::detect::StreamCompression;
use crate::read::reader::Reader;
use crate::read::stream::{ArchiveFormat, DriveDigestCheck, PassReport};
use crate::types::uuid_text;

/// `format` and `version` of the documents: `"vma"` with `"3.0"` or
/// `"2.0"`, or `"proxmox-vma"` with `"1"`.
pub fn format_names(format: ArchiveFormat, header: &Header) -> (&'static str, String) {
    match format {
        ArchiveFormat::V3 | ArchiveFormat::V2 => (
            "vma",
            format!("{}.{}", header.version_major, header.version_minor),
        ),
        ArchiveFormat::VmaV1 => ("proxmox-vma", "1".to_string()),
    }
}

/// What the drive digests of `format` are: `"vma-tree"` (3.0), `"sha256"`
/// (2.0), none (VMA v1).
pub fn digest_kind(format: ArchiveFormat) -> Option<&'static str> {
    match format {
        ArchiveFormat::V3 => Some("vma-tree"),
        ArchiveFormat::V2 => Some("sha256"),
        ArchiveFormat::VmaV1 => None,
    }
}

/// What an archive of `format` cannot prove (the format's limits).
pub fn cannot_prove(format: ArchiveFormat) -> Vec<&'static str> {
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

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso_time(secs: i64) -> String {
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

/// An archive named by another: its uuid and archive digest.
#[derive(Clone, Debug, Serialize)]
pub struct ArchiveRef {
    /// The archive's uuid.
    pub uuid: String,
    /// Its archive digest (hex).
    pub digest: String,
}

impl From<&ParentRef> for ArchiveRef {
    fn from(p: &ParentRef) -> Self {
        ArchiveRef {
            uuid: uuid_text(&p.uuid),
            digest: hex::encode(p.digest),
        }
    }
}

/// A drive in the `list` document.
#[derive(Clone, Debug, Serialize)]
pub struct ListedDrive {
    /// Id.
    pub id: u8,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes its extents take in the archive (complete files only).
    pub stored_bytes: Option<u64>,
    /// Clusters stored as data (complete files only).
    pub data_clusters: Option<u64>,
    /// The recorded drive digest (hex).
    pub digest: Option<String>,
    /// [`digest_kind`].
    pub digest_kind: Option<&'static str>,
    /// The 2.0 record only (the same as `digest`).
    pub sha256: Option<String>,
}

/// A config blob of the point in time, in the `list` document.
#[derive(Clone, Debug, Serialize)]
pub struct ListedConfig {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: usize,
    /// `"archive"` or `"ancestor"`.
    pub source: &'static str,
    /// The ancestor's uuid, when taken from an ancestor.
    pub source_uuid: Option<String>,
    /// The ancestor's file, when taken from an ancestor.
    pub source_path: Option<String>,
}

/// A link of the chain, in the `list --chain` document (newest first).
#[derive(Clone, Debug, Serialize)]
pub struct ListedLink {
    /// Its file.
    pub path: String,
    /// Its uuid.
    pub uuid: String,
    /// Creation time, seconds since the epoch.
    pub ctime: i64,
    /// The same, as [`iso_time`].
    pub ctime_utc: String,
    /// True when it has a parent.
    pub incremental: bool,
    /// True when a drive of it was interrupted.
    pub interrupted: bool,
    /// The uuid of the parent it stands in for, when found as a stand-in.
    pub stands_in_for: Option<String>,
}

/// The `list --json` document (and the mount's `archive.json`).
#[derive(Clone, Debug, Serialize)]
pub struct ListDocument {
    /// [`format_names`].
    pub format: &'static str,
    /// [`format_names`].
    pub version: String,
    /// The archive's uuid.
    pub uuid: String,
    /// Creation time, seconds since the epoch.
    pub ctime: i64,
    /// The same, as [`iso_time`].
    pub ctime_utc: String,
    /// What wrote it (`None` for VMA v1, which has no creator field).
    pub creator: Option<String>,
    /// How its extents (or the whole stream) are compressed.
    pub compression: String,
    /// The parent it names (incremental archives).
    pub parent: Option<ArchiveRef>,
    /// The archives whose point in time it holds (synthetic fulls).
    pub stands_for: Vec<ArchiveRef>,
    /// True when read as a complete file (through its index), false when
    /// it is known to be incomplete, `None` for a stream (compressed or
    /// standard input), which only `vma verify` reads to its end.
    pub complete: Option<bool>,
    /// Why only the header was read.
    pub problem: Option<String>,
    /// The file's size.
    pub archive_size: Option<u64>,
    /// The archive digest (hex).
    pub archive_digest: Option<String>,
    /// The state digest of its point in time (hex, 3.0).
    pub state_digest: Option<String>,
    /// [`cannot_prove`].
    pub cannot_prove: Vec<&'static str>,
    /// Its drives.
    pub drives: Vec<ListedDrive>,
    /// The configs of its point in time.
    pub configs: Vec<ListedConfig>,
    /// Why an incremental archive that stores no VM config shows only
    /// what it stores.
    pub configs_problem: Option<String>,
    /// With `--chain`: the chain, newest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<ListedLink>>,
}

impl ListDocument {
    /// The document of an archive with `header` in `format` (read
    /// decompressed from `compression`), through `reader` when it is a
    /// complete file (`problem`: why not), with the configs of its point in
    /// time.
    pub fn new(
        header: &Header,
        format: ArchiveFormat,
        compression: StreamCompression,
        reader: Option<&Reader>,
        problem: Option<String>,
        configs: &PointConfigs,
    ) -> Self {
        let v3 = format == ArchiveFormat::V3;
        let drives = header
            .drives
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let rec = reader.and_then(|r| r.drive_records().get(i).copied());
                ListedDrive {
                    id: d.id.0,
                    name: d.name.clone(),
                    size: d.size,
                    stored_bytes: rec.map(|r| r.stored_bytes),
                    data_clusters: rec.map(|r| r.data_clusters),
                    digest: rec.and_then(|r| r.digest).map(hex::encode),
                    digest_kind: digest_kind(format),
                    sha256: rec.and_then(|r| r.digest).filter(|_| !v3).map(hex::encode),
                }
            })
            .collect();
        let configs = configs
            .configs
            .iter()
            .map(|(c, source)| {
                let (kind, uuid, path) = match source {
                    ConfigSource::Archive => ("archive", None, None),
                    ConfigSource::Ancestor { uuid, path } => (
                        "ancestor",
                        Some(uuid_text(uuid)),
                        Some(path.display().to_string()),
                    ),
                };
                ListedConfig {
                    name: c.name.clone(),
                    size: c.data.len(),
                    source: kind,
                    source_uuid: uuid,
                    source_path: path,
                }
            })
            .collect();
        let (format_name, version) = format_names(format, header);
        let compression = match (format, compression) {
            (_, StreamCompression::Zstd) => "zstd (whole stream)".to_string(),
            (_, StreamCompression::Gzip) => "gzip (whole stream)".to_string(),
            (_, StreamCompression::Lzo) => "lzo (whole stream)".to_string(),
            (ArchiveFormat::VmaV1, StreamCompression::None) => "none".to_string(),
            (_, StreamCompression::None) => match header.compression.codec {
                Codec::None => "none".into(),
                Codec::Zstd => format!("zstd:{}", header.compression.level),
            },
        };
        ListDocument {
            format: format_name,
            version,
            uuid: uuid_text(&header.uuid),
            ctime: header.ctime,
            ctime_utc: iso_time(header.ctime),
            creator: (format != ArchiveFormat::VmaV1).then(|| header.creator.clone()),
            compression,
            parent: header.parent.as_ref().map(ArchiveRef::from),
            stands_for: header.stands_for.iter().map(ArchiveRef::from).collect(),
            complete: if reader.is_some() {
                Some(true)
            } else if problem.is_some() {
                Some(false)
            } else {
                None
            },
            problem,
            archive_size: reader
                .and_then(|r| std::fs::metadata(r.path()).ok())
                .map(|m| m.len()),
            archive_digest: reader.and_then(|r| r.archive_digest()).map(hex::encode),
            state_digest: reader.and_then(|r| r.state_digest()).map(hex::encode),
            cannot_prove: cannot_prove(format),
            drives,
            configs,
            configs_problem: None,
            chain: None,
        }
    }

    /// The links of a chain (newest first), for `list --chain`.
    pub fn chain_links(links: &[Reader]) -> Vec<ListedLink> {
        links
            .iter()
            .enumerate()
            .map(|(i, r)| {
                // A link found as a stand-in for the parent its child names.
                let wanted = i
                    .checked_sub(1)
                    .and_then(|c| links[c].header().parent)
                    .filter(|p| p.uuid != r.header().uuid);
                ListedLink {
                    path: r.path().display().to_string(),
                    uuid: uuid_text(&r.header().uuid),
                    ctime: r.header().ctime,
                    ctime_utc: iso_time(r.header().ctime),
                    incremental: r.header().parent.is_some(),
                    interrupted: r.drive_records().iter().any(|d| d.interrupted),
                    stands_in_for: wanted.map(|p| uuid_text(&p.uuid)),
                }
            })
            .collect()
    }
}

/// The outcome of a drive digest check, as the documents name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestCheckWord {
    /// The recorded digest matches.
    Match,
    /// It does not.
    Mismatch,
    /// None is recorded.
    NotRecorded,
    /// 2.0, from a pipe: stored out of order.
    OutOfOrder,
    /// Damage made the check impossible.
    NotChecked,
    /// Not asked for.
    Skipped,
}

impl From<&DriveDigestCheck> for DigestCheckWord {
    fn from(c: &DriveDigestCheck) -> Self {
        match c {
            DriveDigestCheck::Match(_) => DigestCheckWord::Match,
            DriveDigestCheck::Mismatch { .. } => DigestCheckWord::Mismatch,
            DriveDigestCheck::NotRecorded => DigestCheckWord::NotRecorded,
            DriveDigestCheck::OutOfOrder => DigestCheckWord::OutOfOrder,
            DriveDigestCheck::NotChecked => DigestCheckWord::NotChecked,
            DriveDigestCheck::Skipped => DigestCheckWord::Skipped,
        }
    }
}

/// A drive in the `verify` document.
#[derive(Clone, Debug, Serialize)]
pub struct VerifiedDrive {
    /// Id.
    pub id: u8,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The check of its drive digest.
    pub digest_check: DigestCheckWord,
    /// The digest found, when it matches (hex).
    pub digest: Option<String>,
    /// [`digest_kind`].
    pub digest_kind: Option<&'static str>,
    /// 2.0: `digest_check` again (3.0: `not-recorded`).
    pub sha256_check: DigestCheckWord,
    /// 2.0: `digest` again.
    pub sha256: Option<String>,
}

/// An ancestor's verification, in the `verify` document.
#[derive(Clone, Debug, Serialize)]
pub struct VerifiedLink {
    /// Its file.
    pub path: String,
    /// Its uuid.
    pub uuid: String,
    /// True when intact.
    pub ok: bool,
    /// Its problems.
    pub problems: Vec<ProblemReport>,
}

/// The `verify --json` document.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyDocument {
    /// True when the archive is intact (ancestors apart: see `chain`).
    pub ok: bool,
    /// [`format_names`].
    pub format: &'static str,
    /// [`format_names`].
    pub version: String,
    /// False for VMA v1.
    pub data_checksums: bool,
    /// [`cannot_prove`].
    pub cannot_prove: Vec<&'static str>,
    /// The archive's uuid.
    pub uuid: String,
    /// Intact extents seen.
    pub extents: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Its drives and their digest checks.
    pub drives: Vec<VerifiedDrive>,
    /// Every problem.
    pub problems: Vec<ProblemReport>,
    /// Ranges held only by damaged extents.
    pub damaged: Vec<RangeReport>,
    /// Ranges no extent holds.
    pub missing: Vec<RangeReport>,
    /// Ranges intact extents hold with different bytes.
    pub conflicting: Vec<RangeReport>,
    /// Each ancestor (path and its own pass).
    pub chain: Vec<VerifiedLink>,
}

impl VerifyDocument {
    /// The document of a pass over an archive and over each of its
    /// ancestors (`links`: path and report).
    pub fn new(report: &PassReport, links: &[(String, PassReport)]) -> Self {
        let format = report.format;
        let header = &report.header;
        let v3 = format == ArchiveFormat::V3;
        let drives = header
            .drives
            .iter()
            .zip(&report.digests)
            .map(|(d, c)| {
                let digest = match c {
                    DriveDigestCheck::Match(x) => Some(hex::encode(x)),
                    _ => None,
                };
                VerifiedDrive {
                    id: d.id.0,
                    name: d.name.clone(),
                    size: d.size,
                    digest_check: c.into(),
                    digest_kind: digest_kind(format),
                    sha256_check: if v3 {
                        DigestCheckWord::NotRecorded
                    } else {
                        c.into()
                    },
                    sha256: if v3 { None } else { digest.clone() },
                    digest,
                }
            })
            .collect();
        let ranges = |r: &[crate::types::DriveRange]| r.iter().map(RangeReport::from).collect();
        let (format_name, version) = format_names(format, header);
        VerifyDocument {
            ok: report.is_clean(),
            format: format_name,
            version,
            data_checksums: format.is_native(),
            cannot_prove: cannot_prove(format),
            uuid: uuid_text(&header.uuid),
            extents: report.extents,
            bytes: report.bytes,
            drives,
            problems: report.problems.iter().map(ProblemReport::from).collect(),
            damaged: ranges(&report.damaged),
            missing: ranges(&report.missing),
            conflicting: ranges(&report.conflicting),
            chain: links
                .iter()
                .map(|(p, r)| VerifiedLink {
                    path: p.clone(),
                    uuid: uuid_text(&r.header.uuid),
                    ok: r.is_clean(),
                    problems: r.problems.iter().map(ProblemReport::from).collect(),
                })
                .collect(),
        }
    }
}

/// A file `extract` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExtractedFile {
    /// Its path.
    pub path: String,
    /// Its size in bytes (0 when it cannot be read back).
    pub size: u64,
}

/// The `extract --json` document: the damage report's keys
/// ([`DamageReport`]) and `files`.
#[derive(Clone, Debug, Serialize)]
pub struct ExtractDocument {
    /// What the pass found and what was written as zeros.
    #[serde(flatten)]
    pub damage: DamageReport,
    /// The files written, in the order they were.
    pub files: Vec<ExtractedFile>,
}

impl ExtractDocument {
    /// The document of an extraction (the files' sizes read back).
    pub fn of(summary: &ExtractSummary) -> ExtractDocument {
        ExtractDocument {
            damage: DamageReport::of_pass(&summary.report),
            files: summary
                .files
                .iter()
                .map(|f| ExtractedFile {
                    path: f.display().to_string(),
                    size: std::fs::metadata(f).map(|m| m.len()).unwrap_or(0),
                })
                .collect(),
        }
    }
}

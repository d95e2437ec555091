//! The one report of damage: what verify found, what a salvage (`extract
//! --salvage`, `mount --salvage`) could not recover. Serialised as is for
//! `--json` output and for the report a mount process hands its parent.

use serde::{Deserialize, Serialize};

use super::reader::Salvage;
use super::stream::PassReport;
use crate::error::Error;
use crate::types::{DriveId, DriveRange};

/// A byte range of a drive, as reports give it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeReport {
    /// The drive's name.
    pub drive: String,
    /// The drive's id.
    pub drive_id: u8,
    /// First byte.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
}

impl From<&DriveRange> for RangeReport {
    fn from(r: &DriveRange) -> Self {
        RangeReport {
            drive: r.drive_name.clone(),
            drive_id: r.drive.0,
            start: r.bytes.start,
            end: r.bytes.end,
        }
    }
}

impl RangeReport {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The drive's id.
    pub fn drive_id(&self) -> DriveId {
        DriveId(self.drive_id)
    }
}

/// What kind of problem a [`ProblemReport`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A structure failed its checks ([`Error::Corrupt`]).
    Corrupt,
    /// The archive ends early ([`Error::Truncated`]).
    Truncated,
    /// An extent failed its checks ([`Error::ExtentDamaged`]).
    ExtentDamaged,
    /// Clusters no extent holds ([`Error::Incomplete`]).
    Incomplete,
    /// A drive digest differs ([`Error::DriveDigestMismatch`]).
    DriveDigestMismatch,
    /// Intact extents hold a cluster differently ([`Error::Conflicting`]).
    Conflicting,
    /// A cluster stored twice ([`Error::Duplicate`]).
    Duplicate,
    /// Anything else.
    Other,
}

/// One problem: its kind, where it is, and the message that says it all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemReport {
    /// The kind.
    pub kind: ProblemKind,
    /// Offset in the archive, where the problem has one.
    pub offset: Option<u64>,
    /// The error's message.
    pub message: String,
    /// The drive ranges it concerns.
    pub ranges: Vec<RangeReport>,
}

impl From<&Error> for ProblemReport {
    fn from(e: &Error) -> Self {
        let ranges = |r: &[DriveRange]| r.iter().map(RangeReport::from).collect();
        let (kind, offset, ranges) = match e {
            Error::Corrupt { offset, .. } => (ProblemKind::Corrupt, Some(*offset), vec![]),
            Error::Truncated { offset, .. } => (ProblemKind::Truncated, Some(*offset), vec![]),
            Error::ExtentDamaged {
                offset, ranges: r, ..
            } => (ProblemKind::ExtentDamaged, Some(*offset), ranges(r)),
            Error::Incomplete { ranges: r, .. } => (ProblemKind::Incomplete, None, ranges(r)),
            Error::DriveDigestMismatch { .. } => (ProblemKind::DriveDigestMismatch, None, vec![]),
            Error::Conflicting { ranges: r, .. } => (ProblemKind::Conflicting, None, ranges(r)),
            Error::Duplicate { ranges: r, .. } => (ProblemKind::Duplicate, None, ranges(r)),
            _ => (ProblemKind::Other, None, vec![]),
        };
        ProblemReport {
            kind,
            offset,
            message: e.to_string(),
            ranges,
        }
    }
}

/// The damage of an archive: every problem, the drive ranges held only by
/// damaged extents, held by none, or held differently by intact extents,
/// and `lost`: every range a salvage wrote or read as zeros, sorted by
/// drive and offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamageReport {
    /// Nothing wrong and nothing lost.
    pub ok: bool,
    /// Every problem, in file order.
    pub problems: Vec<ProblemReport>,
    /// Ranges held only by damaged extents.
    pub damaged: Vec<RangeReport>,
    /// Ranges no extent holds.
    pub missing: Vec<RangeReport>,
    /// Ranges intact extents hold with different bytes.
    pub conflicting: Vec<RangeReport>,
    /// Every range answered with zeros.
    pub lost: Vec<RangeReport>,
    /// Their bytes, summed.
    pub lost_bytes: u64,
}

impl DamageReport {
    /// A report of `problems` and ranges; `lost` as given, else the
    /// damaged, missing and conflicting ranges together.
    pub fn new(
        problems: &[Error],
        damaged: &[DriveRange],
        missing: &[DriveRange],
        conflicting: &[DriveRange],
        lost: Option<&[DriveRange]>,
    ) -> Self {
        let mut all: Vec<&DriveRange> = match lost {
            Some(l) => l.iter().collect(),
            None => damaged.iter().chain(missing).chain(conflicting).collect(),
        };
        all.sort_by_key(|r| (r.drive, r.bytes.start));
        let ranges = |r: &[DriveRange]| r.iter().map(RangeReport::from).collect();
        let lost: Vec<RangeReport> = all.into_iter().map(RangeReport::from).collect();
        DamageReport {
            ok: problems.is_empty() && lost.is_empty(),
            problems: problems.iter().map(ProblemReport::from).collect(),
            damaged: ranges(damaged),
            missing: ranges(missing),
            conflicting: ranges(conflicting),
            lost_bytes: lost.iter().map(RangeReport::len).sum(),
            lost,
        }
    }

    /// The damage a sequential pass (verify, extract) found.
    pub fn of_pass(report: &PassReport) -> Self {
        DamageReport::new(
            &report.problems,
            &report.damaged,
            &report.missing,
            &report.conflicting,
            None,
        )
    }

    /// The damage a salvaging open found (what reads answer with zeros).
    pub fn of_salvage(salvage: &Salvage) -> Self {
        DamageReport::new(
            &salvage.problems,
            &salvage.damaged,
            &salvage.missing,
            &salvage.conflicting,
            Some(&salvage.lost),
        )
    }

    /// One line per problem, then one per lost range with what became of
    /// it (`fate`, e.g. "written as zeros"), for a terminal.
    pub fn lines(&self, fate: &str) -> Vec<String> {
        let problems = self
            .problems
            .iter()
            .map(|p| format!("damaged: {}", p.message));
        let lost = self.lost.iter().map(|r| {
            format!(
                "lost ({fate}): drive {} ({}) bytes {}..{}",
                r.drive, r.drive_id, r.start, r.end
            )
        });
        problems.chain(lost).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_sum_what_is_lost() {
        let range = |id: u8, bytes: std::ops::Range<u64>| DriveRange {
            drive: DriveId(id),
            drive_name: format!("d{id}"),
            bytes,
        };
        let problems = vec![Error::ExtentDamaged {
            offset: 4096,
            seq: Some(0),
            what: "extent digest mismatch".into(),
            ranges: vec![range(2, 0..10)],
        }];
        let r = DamageReport::new(&problems, &[range(2, 0..10)], &[range(1, 5..7)], &[], None);
        assert!(!r.ok);
        assert_eq!(r.lost_bytes, 12);
        assert_eq!(r.lost[0].drive_id, 1, "sorted by drive");
        assert_eq!(r.problems[0].kind, ProblemKind::ExtentDamaged);
        assert_eq!(r.problems[0].offset, Some(4096));
        let doc = serde_json::to_value(&r).unwrap();
        assert_eq!(doc["problems"][0]["kind"], "extent-damaged");
        assert_eq!(doc["lost"][0]["drive"], "d1");
        let back: DamageReport = serde_json::from_value(doc).unwrap();
        assert_eq!(back, r);
        assert!(DamageReport::new(&[], &[], &[], &[], None).ok);
    }
}

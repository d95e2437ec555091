//! `vma convert --salvage`: what a damaged or truncated input lost (written
//! as zero clusters by `vma_core::ops::convert`) is reported as
//! `extract --salvage` reports it.

use anyhow::Result;
use vma_core::read::stream::PassReport;
use vma_core::util::human_bytes;

/// Report what a salvaging pass lost (stderr, one line per problem and
/// range) and give the error that makes the command exit 1; Ok when
/// nothing was lost.
pub(crate) fn outcome(report: &PassReport, output: &str) -> Result<()> {
    if report.problems.is_empty()
        && report.damaged.is_empty()
        && report.missing.is_empty()
        && report.conflicting.is_empty()
    {
        return Ok(());
    }
    let doc = vma_core::read::damage::DamageReport::of_pass(report);
    crate::output::print_damage_text(&doc, "written as zeros");
    Err(crate::Damage(format!(
        "converted what was intact into {output}; {} in {} range(s) could not be recovered and are zeros there",
        human_bytes(doc.lost_bytes),
        report.damaged.len() + report.missing.len() + report.conflicting.len()
    ))
    .into())
}

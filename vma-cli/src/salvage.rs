//! `vma convert --salvage`: what a damaged or truncated input lost is
//! written as zero clusters, and reported as `extract --salvage` reports it.

use anyhow::Result;
use vma_core::format::CLUSTER_SIZE;
use vma_core::read::stream::PassReport;
use vma_core::util::human_bytes;
use vma_core::ClusterWriter;

/// Write every byte range `report` lists as lost (held only by damaged
/// extents, or by none) as zero clusters, so the output is complete.
pub(crate) fn fill_lost(report: &PassReport, writer: &mut dyn ClusterWriter) -> Result<()> {
    let cs = CLUSTER_SIZE as u64;
    for r in report.damaged.iter().chain(&report.missing) {
        writer.write_zeros(r.drive, r.bytes.start / cs..r.bytes.end.div_ceil(cs))?;
    }
    Ok(())
}

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

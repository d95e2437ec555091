//! Full verification: every structure, every digest, completeness, and
//! every drive's whole-content SHA-256.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use crate::chain::Chain;
use crate::format::CLUSTER_SIZE;
use crate::tree::{DriveDigestKind, DriveHash};

use crate::error::{Error, Result};
use crate::read::reader::Reader;
use crate::read::stream::{
    ArchiveFormat, ArchiveStream, DriveDigestCheck, HashDrives, PassOptions, PassReport, ProgressFn,
};

/// How to verify.
#[derive(Clone, Default)]
pub struct VerifyOptions {
    /// Decoder threads (0: one per core).
    pub threads: usize,
    /// 2.0 archives: also compute every drive's plain SHA-256 (the 2.0
    /// drive digest: one sequential hash of every logical byte, zeros
    /// included). 3.0 drive digests are always checked.
    pub drive_digests: bool,
    /// Progress of the steps after the extents.
    pub progress: Option<ProgressFn>,
}

/// Verify an archive read from `stream` in one pass: every structure and
/// digest, completeness, and every drive digest. An incremental archive's
/// drive digests need the leaves of its unchanged clusters: `ancestors`
/// (its parent chain) gives them. For 2.0, with `drive_digests`, when
/// `seekable` names the same archive as a file, drives stored out of order
/// are hashed again through random access so their SHA-256 is checked too.
pub fn verify<R: Read>(
    stream: ArchiveStream<R>,
    threads: usize,
    drive_digests: bool,
    seekable: Option<&Path>,
) -> Result<PassReport> {
    verify_with(
        stream,
        &VerifyOptions {
            threads,
            drive_digests,
            progress: None,
        },
        seekable,
        None,
    )
}

/// [`verify`] with every option, and the parent chain of an incremental archive.
pub fn verify_with<R: Read>(
    stream: ArchiveStream<R>,
    options: &VerifyOptions,
    seekable: Option<&Path>,
    ancestors: Option<&Arc<Chain>>,
) -> Result<PassReport> {
    let format = stream.format();
    let pass_options = PassOptions {
        threads: options.threads,
        keep_going: true,
        hash_drives: if options.drive_digests {
            HashDrives::All
        } else {
            HashDrives::None
        },
        keep_index: false,
        progress: options.progress.clone(),
    };
    let mut source = ancestors
        .filter(|_| format == ArchiveFormat::V3)
        .map(|c| c.leaf_source());
    let mut report = stream.pass_with(
        &pass_options,
        source
            .as_mut()
            .map(|s| &mut **s as &mut dyn crate::index::LeafSource),
        |_| Ok(()),
    )?;
    if !report.is_clean() || format != ArchiveFormat::V2 {
        return Ok(report);
    }
    let Some(path) = seekable else {
        return Ok(report);
    };
    if !report.digests.contains(&DriveDigestCheck::OutOfOrder) {
        return Ok(report);
    }
    let reader = Reader::open(path)?;
    for (slot, d) in report.header.drives.clone().iter().enumerate() {
        if report.digests[slot] != DriveDigestCheck::OutOfOrder {
            continue;
        }
        // The same file as the pass read, unless it changed since.
        let recorded = reader
            .drive_records()
            .get(slot)
            .filter(|r| r.drive == d.id)
            .and_then(|r| r.digest);
        let Some(expected) = recorded else {
            return Err(Error::Invalid(format!(
                "{} changed while it was verified: its index no longer records a digest for drive {}",
                path.display(),
                d.name
            )));
        };
        let mut hash = DriveHash::new(DriveDigestKind::Sha256, d.size);
        let mut buf = vec![0u8; 16 * CLUSTER_SIZE];
        let mut pos = 0;
        while pos < d.size {
            let n = (d.size - pos).min(buf.len() as u64) as usize;
            reader.read_at(d.id, pos, &mut buf[..n])?;
            for (k, cluster) in buf[..n].chunks(CLUSTER_SIZE).enumerate() {
                hash.push_cluster(pos / CLUSTER_SIZE as u64 + k as u64, cluster)?;
            }
            pos += n as u64;
        }
        let found: [u8; 32] = hash.finish()?;
        if found == expected {
            report.digests[slot] = DriveDigestCheck::Match(found);
        } else {
            report.digests[slot] = DriveDigestCheck::Mismatch { expected, found };
            report.problems.push(Error::DriveDigestMismatch {
                drive_name: d.name.clone(),
                expected: hex::encode(expected),
                found: hex::encode(found),
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{DriveInfo, CLUSTER_SIZE};
    use crate::types::{ClusterNo, DriveId};
    use crate::write::writer::{ArchiveMeta, Writer, WriterOptions};

    /// A two-cluster drive written last cluster first.
    fn out_of_order_archive() -> Vec<u8> {
        let meta = ArchiveMeta::new(
            vec![DriveInfo {
                id: DriveId(1),
                name: "d".into(),
                size: 2 * CLUSTER_SIZE as u64,
            }],
            Vec::new(),
        );
        let mut w = Writer::new(Vec::new(), meta, &WriterOptions::default()).unwrap();
        w.write_cluster(DriveId(1), ClusterNo(1), &[2u8; CLUSTER_SIZE])
            .unwrap();
        w.write_cluster(DriveId(1), ClusterNo(0), &[1u8; CLUSTER_SIZE])
            .unwrap();
        w.finish().unwrap().0
    }

    /// Drives written out of order get their drive digest recorded and
    /// checked in one pass, from a pipe too (2.0 could not record one).
    #[test]
    fn out_of_order_drives_are_checked_in_one_pass() {
        let bytes = out_of_order_archive();
        let mut content = vec![1u8; CLUSTER_SIZE];
        content.extend_from_slice(&[2u8; CLUSTER_SIZE]);
        let want = crate::tree::digest_of_bytes(&content);
        let stream = ArchiveStream::open(&bytes[..], "a").unwrap();
        let report = verify(stream, 1, true, None).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(report.digests, vec![DriveDigestCheck::Match(want)]);
    }
}

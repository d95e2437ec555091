//! Full verification: every structure, every digest, completeness, and
//! every drive's whole-content SHA-256.

use std::io::Read;
use std::path::Path;

use crate::digest::Sha256;

use crate::error::{Error, Result};
use crate::reader::Reader;
use crate::stream::{ArchiveStream, DriveDigestCheck, HashDrives, PassOptions, PassReport};

/// Verify an archive read from `reader` in one pass. With `drive_digests`,
/// every drive's whole-content SHA-256 is computed and compared too; when
/// `seekable` names the same archive as a file, drives stored out of order
/// are hashed again through random access so their digest is checked as well.
pub fn verify<R: Read>(
    stream: ArchiveStream<R>,
    threads: usize,
    drive_digests: bool,
    seekable: Option<&Path>,
) -> Result<PassReport> {
    let options = PassOptions {
        threads,
        keep_going: true,
        hash_drives: if drive_digests {
            HashDrives::All
        } else {
            HashDrives::None
        },
    };
    let mut report = stream.pass(&options, |_| Ok(()))?;
    if !report.is_clean() {
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
            .index()
            .drives
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
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < d.size {
            let n = (d.size - pos).min(buf.len() as u64) as usize;
            reader.read_at(d.id, pos, &mut buf[..n])?;
            sha.update(&buf[..n]);
            pos += n as u64;
        }
        let found: [u8; 32] = sha.finish();
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
    use crate::writer::{ArchiveMeta, Writer, WriterOptions};

    /// A two-cluster drive written last cluster first, with its digest
    /// recorded only if `digest` is given.
    fn out_of_order_archive(digest: Option<[u8; 32]>) -> Vec<u8> {
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
        if let Some(d) = digest {
            w.set_drive_digest(DriveId(1), d).unwrap();
        }
        w.finish().unwrap().0
    }

    fn content_digest() -> [u8; 32] {
        let mut sha = Sha256::new();
        sha.update(&[1u8; CLUSTER_SIZE]);
        sha.update(&[2u8; CLUSTER_SIZE]);
        sha.finish()
    }

    #[test]
    fn out_of_order_drives_are_hashed_through_the_file() {
        let bytes = out_of_order_archive(Some(content_digest()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma");
        std::fs::write(&path, &bytes).unwrap();
        let stream = ArchiveStream::open(&bytes[..], "a").unwrap();
        let report = verify(stream, 1, true, Some(&path)).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(
            report.digests,
            vec![DriveDigestCheck::Match(content_digest())]
        );
    }

    /// The file given for the second hash no longer records the digest the
    /// pass saw (it was replaced meanwhile): this panicked.
    #[test]
    fn a_file_changed_during_verify_is_an_error() {
        let bytes = out_of_order_archive(Some(content_digest()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma");
        std::fs::write(&path, out_of_order_archive(None)).unwrap();
        let stream = ArchiveStream::open(&bytes[..], "a").unwrap();
        let err = verify(stream, 1, true, Some(&path)).unwrap_err();
        assert!(
            err.to_string().contains("changed while it was verified"),
            "{err}"
        );
    }
}

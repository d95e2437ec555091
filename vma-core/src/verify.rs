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
        let expected = reader.index().drives[slot]
            .digest
            .expect("out-of-order implies recorded");
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

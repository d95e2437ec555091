//! Format detection by magic bytes, never by file name.

use crate::error::Error;
use crate::format::ARCHIVE_MAGIC;

/// Formats recognised from an input's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectedFormat {
    /// Native vma format, version 2.
    V2,
    /// Proxmox VMA version 1.
    VmaV1,
    /// A zstd stream (vzdump's `.vma.zst`).
    Zstd,
    /// A gzip stream (`.vma.gz`).
    Gzip,
    /// An lzop stream (`.vma.lzo`).
    Lzo,
}

/// Bytes needed to tell every format apart.
pub const DETECT_LEN: usize = 9;

/// Recognise a format from the first bytes of an input.
pub fn detect(prefix: &[u8]) -> Option<DetectedFormat> {
    if prefix.starts_with(&ARCHIVE_MAGIC) {
        Some(DetectedFormat::V2)
    } else if prefix.starts_with(b"VMA\0") {
        Some(DetectedFormat::VmaV1)
    } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(DetectedFormat::Zstd)
    } else if prefix.starts_with(&[0x1f, 0x8b]) {
        Some(DetectedFormat::Gzip)
    } else if prefix.starts_with(b"\x89LZO\0\r\n\x1a\n") {
        Some(DetectedFormat::Lzo)
    } else {
        None
    }
}

/// The error for an input that is not a v2 archive, saying what it is.
pub fn not_v2_error(prefix: &[u8]) -> Error {
    match detect(prefix) {
        Some(DetectedFormat::VmaV1) => Error::UnsupportedFormat {
            format: "Proxmox VMA v1".into(),
            hint: "this build reads only native vma v2 archives".into(),
        },
        Some(f @ (DetectedFormat::Zstd | DetectedFormat::Gzip | DetectedFormat::Lzo)) => {
            Error::UnsupportedFormat {
                format: format!("a {f:?}-compressed stream"),
                hint: "decompress it first (for example `zstd -d -c FILE | vma ... -`)".into(),
            }
        }
        _ => Error::NotAnArchive {
            found: hex::encode(&prefix[..prefix.len().min(8)]),
        },
    }
}

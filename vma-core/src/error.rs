//! The library's error type: every variant says what is wrong and where.

use std::io;

use crate::types::{describe_ranges, DriveRange};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading or writing archives.
///
/// Offsets are absolute byte offsets in the archive file (or stream).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The input does not start with any magic we know.
    #[error("not a vma archive: unknown magic bytes {found} at offset 0 (expected a vma archive (format 3.0 or 2.0) or a Proxmox VMA archive)")]
    NotAnArchive {
        /// The first bytes found, in hex.
        found: String,
    },

    /// The input is something recognisable that is not an archive (a qcow2
    /// image, a tar file, text, ...).
    #[error("{name} is not an archive: it is {what}; {hint}")]
    NotAnArchiveKind {
        /// The input's name.
        name: String,
        /// What the input is.
        what: &'static str,
        /// What to do with it instead.
        hint: &'static str,
    },

    /// A format we recognise but this build cannot read.
    #[error("{format} is not supported here: {hint}")]
    UnsupportedFormat {
        /// The recognised format.
        format: String,
        /// What to do instead.
        hint: String,
    },

    /// A version of the native format this build cannot read.
    #[error("unsupported vma archive version {major}.{minor} at offset 8 (this build reads versions 2.x and 3.x)")]
    UnsupportedVersion {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },

    /// Incompatible feature bits this build does not know.
    #[error("archive needs unknown incompatible features {names} (bits {bits:#x}); a newer vma is required")]
    UnknownFeatures {
        /// The unknown bits.
        bits: u64,
        /// Names of the bits, "bit N" for each.
        names: String,
    },

    /// Structural damage: a field holds an impossible value.
    #[error("corrupt archive at offset {offset}: {what}")]
    Corrupt {
        /// Absolute offset of the damaged structure or field.
        offset: u64,
        /// What was expected and what was found.
        what: String,
    },

    /// The input ended before a structure was complete.
    #[error("archive truncated at offset {offset}: {what}")]
    Truncated {
        /// Offset at which data ran out.
        offset: u64,
        /// What was being read.
        what: String,
    },

    /// An extent failed its checks; its clusters cannot be trusted.
    #[error("extent {}at offset {offset} is damaged ({what}); affected: {}", seq.map(|s| format!("#{s} ")).unwrap_or_default(), if ranges.is_empty() { "no drive range can be named (its entries are unreadable)".to_string() } else { describe_ranges(ranges, 4) })]
    ExtentDamaged {
        /// Extent sequence number, when its header could be read.
        seq: Option<u64>,
        /// Offset of the extent header.
        offset: u64,
        /// What check failed.
        what: String,
        /// Drive byte ranges whose data lives in the extent.
        ranges: Vec<DriveRange>,
    },

    /// Clusters of some drive never appear in the archive.
    #[error("archive is incomplete: {summary}")]
    Incomplete {
        /// Human summary: clusters missing per drive.
        summary: String,
        /// Every missing range.
        ranges: Vec<DriveRange>,
    },

    /// Clusters held by two intact extents with the same bytes.
    #[error("{what}")]
    Duplicate {
        /// What is held twice, where.
        what: String,
        /// The drive ranges held twice.
        ranges: Vec<DriveRange>,
    },

    /// Clusters held by two intact extents with different bytes: which is
    /// the point in time cannot be told, so neither is used.
    #[error("{what}")]
    Conflicting {
        /// What conflicts, where.
        what: String,
        /// The drive ranges in conflict.
        ranges: Vec<DriveRange>,
    },

    /// A drive's digest does not match its content.
    #[error("drive {drive_name}: the drive digest of its content is {found}, the archive records {expected}")]
    DriveDigestMismatch {
        /// The drive's name.
        drive_name: String,
        /// Digest recorded by the writer.
        expected: String,
        /// Digest of the data read back.
        found: String,
    },

    /// The caller asked for something the format's limits forbid.
    #[error("limit exceeded: {0}")]
    Limit(String),

    /// A drive or config name that could be unsafe or is malformed.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The offending name (escaped when printed).
        name: String,
        /// Why it is refused.
        reason: String,
    },

    /// A disk image (qcow2 input) is malformed or inconsistent.
    #[error("disk image {path}: {what}")]
    Image {
        /// The image file.
        path: String,
        /// What is wrong, with the offset where it applies.
        what: String,
    },

    /// A disk image uses a feature this build cannot read.
    #[error("disk image {path} uses {feature}, which vma does not support; convert it first (e.g. `qemu-img convert -O qcow2`)")]
    UnsupportedImage {
        /// The image file.
        path: String,
        /// The feature, by name.
        feature: String,
    },

    /// An output's name is taken and replacing it was not asked for.
    #[error("{path} exists; use --force to replace it")]
    Exists {
        /// The output's final name.
        path: String,
    },

    /// The caller used the API wrongly (unknown drive, duplicate cluster, ...).
    #[error("{0}")]
    Invalid(String),

    /// An archive just written fails its check before it is renamed into
    /// place (so it never was).
    #[error("checking {what}: the archive just written does not verify: {problem}")]
    NotVerified {
        /// What was written (for example "the synthetic full for PATH").
        what: String,
        /// The first problem its verification found.
        problem: String,
    },

    /// A step of an operation of several steps failed: `context` says
    /// which, and what that means for the rest (for example that nothing
    /// was deleted).
    #[error("{context}: {source}")]
    Step {
        /// The step, and what was (not) done because it failed.
        context: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },

    /// An error while reading one archive of several (a chain's link).
    #[error("{path}: {source}")]
    InArchive {
        /// The archive's path.
        path: String,
        /// What went wrong there.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Wrap an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// `self`, as it happened in the archive at `path`.
    pub fn in_archive(self, path: &std::path::Path) -> Self {
        Error::InArchive {
            path: path.display().to_string(),
            source: Box::new(self),
        }
    }

    /// This error as the failure of step `context` (see [`Error::Step`]).
    pub fn in_step(self, context: impl Into<String>) -> Self {
        Error::Step {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// Shorthand for a structural error at `offset`.
    pub fn corrupt(offset: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            offset,
            what: what.into(),
        }
    }

    /// Shorthand for a truncation at `offset`.
    pub fn truncated(offset: u64, what: impl Into<String>) -> Self {
        Error::Truncated {
            offset,
            what: what.into(),
        }
    }

    /// True when the error means the archive's bytes are bad (as opposed to
    /// a usage or I/O problem); the CLI maps this to exit code 1.
    pub fn is_damage(&self) -> bool {
        if let Error::InArchive { source, .. } | Error::Step { source, .. } = self {
            return source.is_damage();
        }
        matches!(
            self,
            Error::NotAnArchive { .. }
                | Error::NotAnArchiveKind { .. }
                | Error::Corrupt { .. }
                | Error::Truncated { .. }
                | Error::ExtentDamaged { .. }
                | Error::Incomplete { .. }
                | Error::DriveDigestMismatch { .. }
                | Error::Duplicate { .. }
                | Error::Conflicting { .. }
                | Error::UnsupportedVersion { .. }
                | Error::UnknownFeatures { .. }
                | Error::NotVerified { .. }
        )
    }
}

/// Helper to attach context to io results.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

//! vma-core: the on-disk formats of vma backup archives, the Writer that
//! takes VM disk clusters in any order, and the Readers (sequential from
//! pipes, random access from files) that everything else is built on.
//!
//! The modules, from the bottom layer up:
//!
//! - [`error`], [`types`], [`digest`], [`tree`]: the error type, value types,
//!   SHA-256 and the drive digest (a Merkle tree over 64 KiB clusters).
//! - [`format`]: on-disk structures and their byte encodings (no I/O): the
//!   native format (3.0, and 2.0 read), Proxmox VMA v1, qcow2, lzop.
//! - [`extent`]: building, encoding and decoding extents.
//! - [`index`]: the paged index, built with bounded memory, read page by page.
//! - [`write`]: clusters in, archive out ([`Writer`]).
//! - [`read`]: one sequential pass ([`ArchiveStream`]) and random access
//!   ([`Reader`]).
//! - [`chain`]: incremental chains, every link proven by content.
//! - [`ops`]: verify, extract, convert, merge, prune, diff, checksum.
//! - [`image`]: disk images (raw files, block devices, qcow2) as sources
//!   and targets; [`atomic`]: output files that appear complete or not at all.

#![warn(missing_docs)]

pub mod atomic;
pub mod chain;
pub mod digest;
pub mod error;
pub mod extent;
pub mod format;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod image;
pub mod index;
pub mod ops;
pub mod read;
pub mod storage;
pub mod tree;
pub mod types;
pub mod util;
pub mod write;

pub use error::{Error, Result};
pub use format::{check_name, ConfigBlob, DriveInfo, Header, CLUSTER_SIZE};
pub use read::reader::Reader;
pub use read::stream::{ArchiveStream, HashDrives, PassOptions, PassReport};
pub use types::{ClusterNo, DriveId, DriveRange};
pub use write::writer::{ArchiveMeta, ClusterWriter, Compression, Writer, WriterOptions};

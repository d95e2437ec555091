//! vma-core: the on-disk formats of vma backup archives, the Writer that
//! takes VM disk clusters in any order, and the Readers (sequential from
//! pipes, random access from files) that everything else is built on.
//!
//! - [`format`]: on-disk structures and their byte encodings (no I/O).
//! - [`tree`]: the drive digest (a Merkle tree over 64 KiB clusters).
//! - [`index`]: the paged index, built with bounded memory, read page by page.
//! - [`Writer`]: clusters in, archive out (file or pipe).
//! - [`ArchiveStream`]: one sequential pass, shared by verify and extract.
//! - [`Reader`]: random access to any byte range of any drive.
//! - [`chain`]: incremental chains, every link proven by content.

#![warn(missing_docs)]

pub mod atomic;
pub mod chain;
pub mod checksum;
pub mod configs;
pub mod convert;
pub mod detect;
pub mod diff;
pub mod digest;
pub mod error;
pub mod extent;
pub mod extract;
pub mod format;
pub mod format_v1;
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
mod input;
pub mod lzop;
pub mod merge;
mod pipeline;
pub mod prune;
pub mod qcow2;
pub mod ranges;
pub mod reader;
pub mod source;
mod spool;
pub mod storage;
pub mod stream;
pub mod tree;
pub mod types;
pub mod verify;
pub mod writer;
pub mod writer_v1;

pub use error::{Error, Result};
pub use format::{ConfigBlob, DriveInfo, Header};
pub use reader::Reader;
pub use stream::{ArchiveStream, HashDrives, PassOptions, PassReport};
pub use types::{ClusterNo, DriveId, DriveRange};
pub use writer::{ArchiveMeta, ClusterWriter, Compression, Writer, WriterOptions};

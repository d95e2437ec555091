//! Operations over archives, chains and disk images, composed from the
//! readers, writers and image I/O below them. Each is one command of the CLI.
//!
//! - [`verify`]: every structure, every digest, completeness.
//! - [`extract`]: drives and configs to raw or qcow2 files.
//! - [`create`]: disk images into a new archive, full or incremental.
//! - [`convert`]: any archive into either format.
//! - [`merge`]: synthetic fulls of a chain.
//! - [`prune`]: retention plans and their execution.
//! - [`output`]: archive outputs that appear complete or not at all.
//! - [`diff`]: incremental archives made by comparing an image with a chain.
//! - [`checksum`]: drive digests of disk images and archived drives.
//! - [`report`]: the documents of `list` and `verify` (`--json`).

pub mod checksum;
pub mod convert;
pub mod create;
pub mod diff;
pub mod extract;
pub mod merge;
pub mod output;
pub mod prune;
pub mod report;
pub mod verify;

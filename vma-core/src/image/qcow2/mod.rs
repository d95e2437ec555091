//! qcow2 disk images: every command that reads or writes qcow2 goes
//! through this module.
//!
//! - [`crate::format::qcow2`]: header, extensions and table entries (no I/O).
//! - [`read`]: images as archive sources (`create`), backing chains included.
//! - [`write`]: images as extraction targets (`extract --format qcow2`).

pub mod read;
pub mod write;

pub use read::{BackingPolicy, Qcow2Image};
pub use write::{compress_cluster, Qcow2Writer};

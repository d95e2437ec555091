//! On-disk structures and their byte encodings, one module per format, with
//! no I/O: every function turns bytes into values or values into bytes. The
//! code that reads and writes files sits on top of this layer (`read`,
//! `write`, `image`).
//!
//! - [`v3`]: the native format, revision 3.0 (written and read); its items
//!   are also re-exported here, so `format::Header` is the 3.0 header.
//! - [`v2`]: native archives of revision 2.0 (read, never written).
//! - [`v1`]: Proxmox VMA version 1 (`vzdump` backups).
//! - [`qcow2`]: qcow2 headers, extensions and table entries.
//! - [`lzop`]: the lzop framing of `.vma.lzo` files.

pub mod field;
pub mod lzop;
pub mod qcow2;
pub mod v1;
pub mod v2;
pub mod v3;

pub use v3::*;

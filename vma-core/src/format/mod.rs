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
//!
//! Every fixed-size block is described once with `field::fixed_block!`:
//! its name, length and one [`field::Field`] constant per field (name,
//! offset, width), checked at compile time to cover the block exactly.
//! Blocks are read through [`field::FieldReader`] and built through
//! [`field::FieldWriter`], with the endianness in each method's name;
//! a short read is an error naming the structure and the absolute file
//! offset of the field, and messages take offsets from the layouts.

pub mod field;
pub mod lzop;
pub mod qcow2;
pub mod v1;
pub mod v2;
pub mod v3;

pub use v3::*;

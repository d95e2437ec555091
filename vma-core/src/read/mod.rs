//! Readers of archives, on top of [`crate::format`] and [`crate::extent`].
//!
//! - [`detect`]: the format of an input, by magic bytes.
//! - [`stream`]: one sequential pass from any `Read` (file or pipe).
//! - [`reader`]: random access to a complete archive file through its index.
//! - [`damage`]: the one report of damage (verify, salvage, mount, `--json`).

pub mod damage;
pub mod detect;
pub(crate) mod input;
pub mod reader;
pub mod stream;

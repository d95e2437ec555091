//! Writers of archives: clusters of any drive in any order in, an archive out.
//!
//! - [`writer`]: the native 3.0 writer.
//! - [`v1`]: Proxmox VMA version 1.

pub mod v1;
pub mod writer;

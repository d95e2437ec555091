//! Live capture of running QEMU VMs into vma archives.
//!
//! QEMU's own backup job does the copy-before-write: a `blockdev-backup`
//! job per drive whose target is an NBD client node connected to an NBD
//! server of `vma-nbd`; what the job writes (clusters in the order the guest
//! overwrites them, then the rest) goes straight into the archive Writer.
//! [`qmp`] drives QEMU over its monitor socket. With fleecing
//! ([`fleece`]) the jobs read point-in-time views instead of the drives,
//! and [`live_diff`] reads such views itself, through [`nbd_image`], to
//! compare them with an earlier archive.

pub mod assemble;
pub mod capture;
pub mod fleece;
#[doc(hidden)]
pub mod fuzzing;
mod leftovers;
pub mod live_diff;
pub mod nbd_image;
pub mod qga;
pub mod qmp;

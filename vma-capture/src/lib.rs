//! Live capture of running QEMU VMs into vma archives.
//!
//! QEMU's own backup job does the copy-before-write: a `blockdev-backup`
//! job per drive whose target is an NBD client node connected to an NBD
//! server of `vma-nbd`; what the job writes (clusters in the order the
//! guest overwrites them, then the rest) goes straight into the archive
//! Writer. [`qmp`] drives QEMU over its monitor socket. With fleecing
//! ([`fleece`]) the jobs read point-in-time views instead of the drives,
//! and [`live_diff`] reads such views itself, through [`nbd_image`], to
//! compare them with an earlier archive.
//!
//! The modules, top down: each uses only modules listed below it.
//!
//! ```text
//! capture     entry point: checks the target, picks a way; the public types
//! backup      capture by backup jobs writing into our NBD server
//! live_diff   capture by comparing views with an earlier archive
//! fleece      point-in-time views: scratch images, fleecing jobs, exports
//! session     what both ways share with QEMU: connect, drives, checkpoint
//!             bitmaps, freezing the guest around the transaction
//! leftovers   removing what a dead capture left in QEMU
//! options     what a capture is asked and what it reports
//! record      the capture record stored in each archive
//! error       CaptureError
//! assemble    byte-range writes -> whole clusters
//! nbd_image   an NBD export as a vma-core source image
//! qga         the guest agent (freeze, thaw)
//! qmp         QMP client and commands as types
//! ```
//!
//! The last four use no other module of the crate. `backup` uses assemble, fleece, session, options, record, error, qmp;
//! `live_diff` uses nbd_image, fleece, session, options, record, error,
//! qmp; `session` uses leftovers, options, record, error, qga, qmp.

pub mod assemble;
mod backup;
pub mod capture;
mod error;
pub mod fleece;
#[doc(hidden)]
pub mod fuzzing;
mod leftovers;
pub mod live_diff;
pub mod live_restore;
pub mod nbd_image;
mod options;
pub mod qga;
pub mod qmp;
mod record;
mod session;

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
//! The modules, each using only those below it:
//!
//! ```text
//! capture            entry point: checks the target, picks a way, public types
//! ├── backup         capture by backup jobs writing into our NBD server
//! │   └── assemble   byte-range writes -> whole clusters
//! └── live_diff      capture by comparing views with an earlier archive
//!     └── nbd_image  an NBD export as a vma-core source image
//! fleece             point-in-time views (scratch images, jobs, exports)   [backup, live_diff]
//! session            connect, find drives, checkpoint bitmaps, freeze      [backup, live_diff]
//! ├── leftovers      remove what a dead capture left in QEMU
//! └── qga            guest agent (freeze/thaw)
//! record             the capture record stored in each archive
//! options            what a capture is asked and what it reports
//! error              CaptureError, used by all of the above
//! qmp                QMP client and typed commands (depends on nothing above)
//! ```

pub mod assemble;
mod backup;
pub mod capture;
mod error;
pub mod fleece;
#[doc(hidden)]
pub mod fuzzing;
mod leftovers;
pub mod live_diff;
pub mod nbd_image;
mod options;
pub mod qga;
pub mod qmp;
mod record;
mod session;

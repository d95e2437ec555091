//! The Network Block Device protocol, both sides, over unix sockets and TCP.
//!
//! - [`wire`]: the byte layout of every message, pure functions without
//!   I/O, shared by both sides.
//! - [`server`]: a fixed-newstyle server over exports that implement
//!   [`NbdExport`]: write-only targets (QEMU's backup job writes a drive
//!   into one during `vma capture`) and read-only views (QEMU, `qemu-img`
//!   or `nbdinfo` read an archive's drives from one), with structured
//!   replies and block status where an export can be read.
//! - [`tls`]: X.509 credentials and the TLS layer the server puts under a
//!   connection after `NBD_OPT_STARTTLS`.
//! - [`client`]: reads an export of another server (QEMU's point-in-time
//!   views during `vma capture --diff-against`), with requests in flight,
//!   structured replies and `base:allocation`.
//!
//! The protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod server;
pub mod tls;
pub mod wire;

pub use client::NbdClient;
pub use server::{BlockSize, Export, ExportFlags, NbdExport, NbdServer, StatusExtent};

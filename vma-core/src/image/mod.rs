//! Disk images as sources and targets: raw files and block devices
//! ([`source`]) and qcow2 ([`qcow2`]).

pub mod qcow2;
pub mod source;

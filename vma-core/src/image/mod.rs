//! Disk images as sources and targets: raw files and block devices
//! ([`source`]), qcow2 ([`qcow2`]), and image arguments as commands take
//! them ([`args`]).

pub mod args;
pub mod qcow2;
pub mod source;

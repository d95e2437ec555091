//! Building blocks with no knowledge of any format.

pub(crate) mod pipeline;
pub mod ranges;
pub(crate) mod spool;

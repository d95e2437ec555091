//! Building blocks with no knowledge of any format.

pub mod count;
pub(crate) mod pipeline;
pub mod ranges;
pub(crate) mod spool;

use std::sync::Arc;

pub use count::Counting;

/// Called with what a long step is doing, how far it got and of how much.
pub type ProgressFn = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Most worker threads any pool starts, whatever is asked.
pub const MAX_THREADS: usize = 64;

/// Number of worker threads to use for `requested` (0 = one per core),
/// at most [`MAX_THREADS`].
pub fn effective_threads(requested: usize) -> usize {
    if requested > 0 {
        requested.min(MAX_THREADS)
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get().min(MAX_THREADS))
    }
}

/// Format a byte count for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

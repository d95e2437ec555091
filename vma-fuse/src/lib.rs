//! Read-only FUSE view of vma archives (each drive as a file). Filled in by the mount work.

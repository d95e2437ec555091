//! NBD server (fixed newstyle) that hands what clients write to a sink.

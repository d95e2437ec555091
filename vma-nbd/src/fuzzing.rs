//! Body of the `nbd` fuzz target in `fuzz/`, kept in the library so that
//! its corpus is also replayed by an ordinary `cargo test`
//! (`tests/fuzz_corpus.rs`). It panics only where the server broke a
//! promise.

use std::io;
use std::sync::{Arc, Mutex};

use crate::server::{self, Export, ExportFlags, NbdExport, StatusExtent};
use crate::wire;

/// An export that checks every range it is handed against its size.
struct Checked {
    name: &'static str,
    size: u64,
    flags: ExportFlags,
    /// Bytes written, zeroed and trimmed; bytes read.
    counts: Mutex<(u64, u64)>,
}

impl Checked {
    fn check(&self, offset: u64, len: u64) {
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|end| end <= self.size),
            "export {:?} ({} bytes) was handed {len} bytes at {offset}",
            self.name,
            self.size
        );
    }

    fn record(&self, offset: u64, len: u64) -> io::Result<()> {
        assert!(self.flags.writable, "a write reached a read-only export");
        self.check(offset, len);
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).0 += len;
        // Let some writes fail, as a full disk would.
        if offset % 7 == 3 {
            return Err(io::Error::other("the sink is full"));
        }
        Ok(())
    }
}

impl NbdExport for Checked {
    fn size(&self) -> u64 {
        self.size
    }
    fn flags(&self) -> ExportFlags {
        self.flags
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        assert!(self.flags.readable, "a read reached a write-only export");
        self.check(offset, buf.len() as u64);
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).1 += buf.len() as u64;
        if offset % 7 == 3 {
            return Err(io::Error::other("unreadable"));
        }
        buf.fill(offset as u8);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.record(offset, data.len() as u64)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(offset, len)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(offset, len)
    }
    fn meta_contexts(&self) -> Vec<String> {
        if self.flags.readable {
            vec![wire::BASE_ALLOCATION.into(), "qemu:dirty-bitmap:b0".into()]
        } else {
            Vec::new()
        }
    }
    fn block_status(&self, _: &str, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        self.check(offset, len);
        // Stretches of 4 KiB, alternating data and zeros, the last reaching
        // past the request.
        Ok((0..3)
            .map(|i| StatusExtent {
                len: 4096,
                flags: if i % 2 == 0 { 0 } else { wire::STATE_ZERO },
            })
            .collect())
    }
}

/// Client bytes to the NBD server: handshake (options), then requests,
/// served to completion with the replies collected in memory, once by a
/// server of write-only targets and once by a server of read-only views,
/// each also as a TLS-only server before TLS.
/// Every range that reaches an export must lie inside it, and only the
/// operations it allows may reach it.
pub fn nbd(client_bytes: &[u8]) -> NbdOutcome {
    let mut outcome = NbdOutcome::default();
    for flags in [ExportFlags::WRITE_ONLY, ExportFlags::READ_ONLY] {
        // The default export, and one whose size is not a multiple of 512.
        let served = [("", 1 << 20), ("drive-scsi0", 70_001)].map(|(name, size)| {
            Arc::new(Checked {
                name,
                size,
                flags,
                counts: Mutex::new((0, 0)),
            })
        });
        let exports = served
            .clone()
            .map(|e| Export::new(e.name, e as Arc<dyn NbdExport>));
        // A TLS-only server before TLS: nothing may reach an export.
        let mut replies = Vec::new();
        let mut input = client_bytes;
        let _ = server::haggle_before_tls(&mut input, &mut replies, &exports);
        for e in &served {
            let counts = *e.counts.lock().unwrap_or_else(|e| e.into_inner());
            assert_eq!(counts, (0, 0), "an export was used before TLS");
        }
        outcome.reply_bytes += replies.len();
        let mut replies = Vec::new();
        let mut input = client_bytes;
        let _ = server::serve(&mut input, &mut replies, &exports);
        outcome.reply_bytes += replies.len();
        for e in &served {
            let (written, read) = *e.counts.lock().unwrap_or_else(|e| e.into_inner());
            outcome.written += written;
            outcome.read += read;
        }
    }
    outcome
}

/// What [`nbd`] saw (for tests of the corpora).
#[derive(Debug, Default)]
pub struct NbdOutcome {
    /// Bytes the servers sent (greeting, option replies, replies).
    pub reply_bytes: usize,
    /// Bytes of writes, write-zeroes and trims that reached the targets.
    pub written: u64,
    /// Bytes the views were asked to read.
    pub read: u64,
}

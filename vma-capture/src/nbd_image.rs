//! An NBD export read as a source image: vma-core's [`DiskImage`] over
//! the [`NbdClient`] of `vma-nbd`, so [`crate::live_diff`] reads QEMU's
//! point-in-time views like any other image.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use vma_core::image::source::{DiskImage, Stretch};
use vma_nbd::client::Extent;
use vma_nbd::NbdClient;

/// Bytes asked for in one block status request.
const STATUS_BYTES: u64 = 1 << 30;

/// An NBD client error as vma-core reports a source's.
fn source_error(e: vma_nbd::client::Error) -> vma_core::Error {
    vma_core::Error::Invalid(e.to_string())
}

/// An NBD export as a source image: status from `base:allocation` (one
/// request answers a gigabyte), reads through the client.
pub struct NbdImage {
    client: NbdClient,
    /// Where the export is, for messages (`socket#export`).
    label: PathBuf,
    /// The last block status answer: (start, extents).
    status: Mutex<Option<(u64, Vec<Extent>)>>,
}

impl NbdImage {
    /// Read `client`'s export as an image.
    pub fn new(client: NbdClient) -> NbdImage {
        let label = PathBuf::from(format!("{}#{}", client.socket().display(), client.export()));
        NbdImage {
            client,
            label,
            status: Mutex::new(None),
        }
    }

    /// The client underneath.
    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    /// Disconnect from the server.
    pub fn disconnect(self) {
        self.client.disconnect();
    }
}

impl DiskImage for NbdImage {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn path(&self) -> &Path {
        &self.label
    }

    fn status(&self, offset: u64) -> vma_core::Result<Stretch> {
        let mut cache = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = |c: &Option<(u64, Vec<Extent>)>| -> Option<Stretch> {
            let (start, extents) = c.as_ref()?;
            let mut at = *start;
            for e in extents {
                if offset >= at && offset < at + e.len {
                    let rest = at + e.len - offset;
                    return Some(if e.zero {
                        Stretch::Zero(rest)
                    } else {
                        Stretch::Data(rest)
                    });
                }
                at += e.len;
            }
            None
        };
        if let Some(s) = cached(&cache) {
            return Ok(s);
        }
        let len = (self.client.size() - offset).min(STATUS_BYTES);
        let extents = self
            .client
            .block_status(offset, len)
            .map_err(source_error)?;
        *cache = Some((offset, extents));
        Ok(cached(&cache).expect("the first extent starts at the offset"))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vma_core::Result<()> {
        self.client.read_at(offset, buf).map_err(source_error)
    }
}

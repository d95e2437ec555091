//! Format detection by magic bytes, never by file name.

use std::io::Read;

use crate::error::{Error, Result};
use crate::format::ARCHIVE_MAGIC;
use crate::read::stream::ArchiveStream;

/// Formats recognised from an input's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectedFormat {
    /// Native vma format (version 2 or 3).
    Native,
    /// Proxmox VMA version 1.
    VmaV1,
    /// A zstd stream (vzdump's `.vma.zst`).
    Zstd,
    /// A gzip stream (`.vma.gz`).
    Gzip,
    /// An lzop stream (`.vma.lzo`).
    Lzo,
}

/// Bytes needed to tell every format apart.
pub const DETECT_LEN: usize = 9;

/// Recognise a format from the first bytes of an input.
pub fn detect(prefix: &[u8]) -> Option<DetectedFormat> {
    if prefix.starts_with(&ARCHIVE_MAGIC) {
        Some(DetectedFormat::Native)
    } else if prefix.starts_with(b"VMA\0") {
        Some(DetectedFormat::VmaV1)
    } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(DetectedFormat::Zstd)
    } else if prefix.starts_with(&[0x1f, 0x8b]) {
        Some(DetectedFormat::Gzip)
    } else if prefix.starts_with(b"\x89LZO\0\r\n\x1a\n") {
        Some(DetectedFormat::Lzo)
    } else {
        None
    }
}

/// Bytes [`describe_other`] looks at to say what a non-archive is.
pub const DESCRIBE_LEN: usize = 1024;

/// What an input that is not an archive is, told from its first bytes (up
/// to [`DESCRIBE_LEN`]) when that is clear, with what to do with it: the
/// first part says what it is, the second the next step.
pub fn describe_other(prefix: &[u8]) -> Option<(&'static str, &'static str)> {
    const USE_AS_SOURCE: &str =
        "to back it up, use it as a create source: `vma create ARCHIVE.vma IMAGE`";
    if prefix.is_empty() {
        return Some((
            "empty",
            "an archive starts with a header; was it copied completely?",
        ));
    }
    if prefix.starts_with(b"QFI\xfb") {
        return Some(("a qcow2 image", USE_AS_SOURCE));
    }
    if prefix.len() >= 262 && &prefix[257..262] == b"ustar" {
        return Some((
            "a tar archive",
            "vma reads vma and Proxmox VMA archives; unpack it with `tar -xf` and look for a .vma file inside",
        ));
    }
    if prefix.starts_with(b"\x7fELF") {
        return Some(("an executable (ELF)", "give the path of an archive"));
    }
    if prefix.len() >= 520 && &prefix[512..520] == b"EFI PART" {
        return Some(("a disk image (GPT partition table)", USE_AS_SOURCE));
    }
    if prefix.len() >= 512 && prefix[510..512] == [0x55, 0xaa] {
        return Some(("a disk image (MBR boot sector)", USE_AS_SOURCE));
    }
    if is_text(prefix) {
        return Some((
            "a text file",
            "if it is a VM config, store it in an archive with `vma create --config FILE`",
        ));
    }
    None
}

/// Whether `prefix` reads as text: UTF-8 (a character cut at the end
/// allowed) without control characters other than whitespace.
fn is_text(prefix: &[u8]) -> bool {
    let text = match std::str::from_utf8(prefix) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&prefix[..e.valid_up_to()]).unwrap_or("")
        }
        Err(_) => return false,
    };
    !text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t' | '\x0c'))
}

/// The error for an input that is not an archive this reader can open
/// directly, saying what it is.
pub fn not_v2_error(prefix: &[u8]) -> Error {
    match detect(prefix) {
        Some(f @ (DetectedFormat::Zstd | DetectedFormat::Gzip | DetectedFormat::Lzo)) => {
            Error::UnsupportedFormat {
                format: format!("a {f:?}-compressed stream inside a compressed stream"),
                hint: "decompress the outer layer first".into(),
            }
        }
        _ => Error::NotAnArchive {
            found: hex::encode(&prefix[..prefix.len().min(8)]),
        },
    }
}

/// Turns a decompressor's read errors into `InvalidData`, which the stream
/// reader reports as damage at the current offset.
struct DamageOnError<R>(R);

impl<R: Read> Read for DamageOnError<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::Interrupted {
                e
            } else {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("compressed stream is damaged: {e}"),
                )
            }
        })
    }
}

/// How the input of [`open_any`] was wrapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamCompression {
    /// Read as is.
    None,
    /// Decompressed from a zstd stream (vzdump's `.vma.zst`).
    Zstd,
    /// Decompressed from a gzip stream (`.vma.gz`).
    Gzip,
    /// Decompressed from an lzop stream (`.vma.lzo`).
    Lzo,
}

/// Open any archive from a reader: native v2 or VMA v1, plain or inside a
/// whole-stream zstd, gzip or lzop compression (decompressed in-process). The
/// format is told by magic bytes only.
/// Decompression runs on a thread of its own, ahead of the reader.
pub fn open_any(
    mut reader: impl Read + Send + 'static,
    name: &str,
) -> Result<(ArchiveStream<Box<dyn Read>>, StreamCompression)> {
    let mut prefix = Vec::with_capacity(DETECT_LEN);
    let mut chunk = [0u8; DETECT_LEN];
    while prefix.len() < DETECT_LEN {
        match reader.read(&mut chunk[..DETECT_LEN - prefix.len()]) {
            Ok(0) => break,
            Ok(n) => prefix.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading {name}"), e)),
        }
    }
    let kind = detect(&prefix);
    let whole = std::io::Cursor::new(prefix).chain(reader);
    let (input, compression): (Box<dyn Read>, _) = match kind {
        Some(DetectedFormat::Zstd) => {
            let dec = zstd::stream::read::Decoder::new(whole)
                .map_err(|e| Error::io(format!("starting zstd decompression of {name}"), e))?;
            (
                Box::new(ReadAhead::new(DamageOnError(dec))),
                StreamCompression::Zstd,
            )
        }
        Some(DetectedFormat::Gzip) => (
            Box::new(ReadAhead::new(DamageOnError(
                flate2::read::MultiGzDecoder::new(whole),
            ))),
            StreamCompression::Gzip,
        ),
        Some(DetectedFormat::Lzo) => {
            let dec = crate::format::lzop::LzopReader::new(whole).map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    Error::corrupt(0, e.to_string())
                } else {
                    Error::io(format!("reading {name}"), e)
                }
            })?;
            (
                Box::new(ReadAhead::new(DamageOnError(dec))),
                StreamCompression::Lzo,
            )
        }
        _ => (Box::new(whole), StreamCompression::None),
    };
    let name = match compression {
        StreamCompression::None => name.to_string(),
        StreamCompression::Zstd => format!("{name} (after zstd decompression)"),
        StreamCompression::Gzip => format!("{name} (after gzip decompression)"),
        StreamCompression::Lzo => format!("{name} (after lzop decompression)"),
    };
    Ok((ArchiveStream::open(input, &name)?, compression))
}

/// Reads from an inner reader on a thread of its own, up to 8 MiB ahead, so
/// that decompressing a stream overlaps with the work done on its data.
struct ReadAhead {
    rx: crossbeam_channel::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl ReadAhead {
    fn new(mut inner: impl Read + Send + 'static) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(8);
        std::thread::Builder::new()
            .name("vma-read-ahead".into())
            .spawn(move || loop {
                let mut buf = vec![0u8; 1 << 20];
                let mut filled = 0;
                let result = loop {
                    match inner.read(&mut buf[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(filled);
                let end = filled == 0;
                if !buf.is_empty() && tx.send(Ok(buf)).is_err() {
                    return;
                }
                if let Err(e) = result {
                    let _ = tx.send(Err(e));
                    return;
                }
                if end {
                    return;
                }
            })
            .expect("spawning the read-ahead thread");
        ReadAhead {
            rx,
            current: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    self.current = buf;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

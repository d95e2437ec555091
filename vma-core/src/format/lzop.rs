//! Reading lzop streams (`.vma.lzo`, as `vzdump --compress lzo` writes
//! them): the lzop container parsed here, each LZO1X block decoded by the
//! `lzo` crate (safe Rust), and every checksum the stream carries checked,
//! so damage is an error, never wrong bytes.
//!
//! Layout (all integers big-endian), after the 9-byte magic:
//! - `version` u16, `lib_version` u16, `version_needed` u16 (if version is
//!   0x0940 or later), `method` u8, `level` u8 (0x0940 or later), `flags`
//!   u32, `filter` u32 (with flag H_FILTER), `mode` u32, `mtime_low` u32,
//!   `mtime_high` u32 (0x0940 or later), `name_len` u8 and the name;
//! - the header checksum u32 (Adler-32, or CRC-32 with flag H_CRC32) over
//!   everything after the magic;
//! - an optional extra field (flag H_EXTRA_FIELD: length u32, bytes,
//!   checksum u32);
//! - blocks: `dst_len` u32 (0 ends the stream), `src_len` u32, the
//!   checksum(s) of the decoded data (flags ADLER32_D, CRC32_D), of the
//!   stored data when it is compressed (ADLER32_C, CRC32_C), and `src_len`
//!   bytes: LZO1X when `src_len < dst_len`, else stored as is.

use std::io::{self, Read};

use super::field::FieldReader;

/// The magic that starts every lzop stream.
pub const LZOP_MAGIC: [u8; 9] = *b"\x89LZO\0\r\n\x1a\n";

const F_ADLER32_D: u32 = 0x1;
const F_ADLER32_C: u32 = 0x2;
const F_H_EXTRA_FIELD: u32 = 0x40;
const F_CRC32_D: u32 = 0x100;
const F_CRC32_C: u32 = 0x200;
const F_MULTIPART: u32 = 0x400;
const F_H_FILTER: u32 = 0x800;
const F_H_CRC32: u32 = 0x1000;

/// lzop's own limit on a block's decoded size.
const MAX_BLOCK: usize = 64 << 20;
/// An extra header field larger than this is refused (lzop writes none).
const MAX_EXTRA: usize = 1 << 20;

/// Adler-32 (RFC 1950) of `data`, continuing from `a` (1 to start).
fn adler32(mut a: u32, data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut s1, mut s2) = (a & 0xffff, a >> 16);
    // 5552 bytes is the most that keeps s2 below 2^32 between reductions.
    for chunk in data.chunks(5552) {
        for &b in chunk {
            s1 += b as u32;
            s2 += s1;
        }
        s1 %= MOD;
        s2 %= MOD;
    }
    a = (s2 << 16) | s1;
    a
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

fn damaged(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("lzop stream: {what}"))
}

/// Decodes an lzop stream, checking every checksum it carries.
pub struct LzopReader<R: Read> {
    inner: R,
    flags: u32,
    /// Where the stream is, for messages.
    offset: u64,
    /// The decoded block being handed out.
    block: Vec<u8>,
    pos: usize,
    stored: Vec<u8>,
    done: bool,
}

impl<R: Read> LzopReader<R> {
    /// Read and check the lzop header from `inner` (which starts at the magic).
    pub fn new(mut inner: R) -> io::Result<Self> {
        let mut magic = [0u8; 9];
        inner.read_exact(&mut magic)?;
        if magic != LZOP_MAGIC {
            return Err(damaged("no lzop magic at the start".into()));
        }
        let mut reader = LzopReader {
            inner,
            flags: 0,
            offset: 9,
            block: Vec::new(),
            pos: 0,
            stored: Vec::new(),
            done: false,
        };
        reader.read_header()?;
        Ok(reader)
    }

    fn take(&mut self, n: usize, into: &mut Vec<u8>) -> io::Result<()> {
        let start = into.len();
        into.resize(start + n, 0);
        self.inner.read_exact(&mut into[start..]).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                damaged(format!(
                    "ends at offset {} inside a {n}-byte field",
                    self.offset
                ))
            } else {
                e
            }
        })?;
        self.offset += n as u64;
        Ok(())
    }

    fn u32(&mut self) -> io::Result<u32> {
        let at = self.offset;
        let mut b = Vec::with_capacity(4);
        self.take(4, &mut b)?;
        FieldReader::new(&b, at, "lzop stream")
            .u32_be()
            .map_err(|e| damaged(e.to_string()))
    }

    fn read_header(&mut self) -> io::Result<()> {
        let header_at = self.offset;
        let mut h = Vec::with_capacity(64);
        self.take(4, &mut h)?;
        let version = FieldReader::new(&h, header_at, "lzop header")
            .u16_be()
            .map_err(|e| damaged(e.to_string()))?;
        if version < 0x0900 {
            return Err(damaged(format!(
                "header version {version:#06x} is not an lzop version"
            )));
        }
        let new_layout = version >= 0x0940;
        if new_layout {
            self.take(2, &mut h)?;
        }
        let method_at = h.len();
        self.take(if new_layout { 2 } else { 1 }, &mut h)?;
        let method = h[method_at];
        if !(1..=3).contains(&method) {
            return Err(damaged(format!(
                "compression method {method} is not LZO1X (only methods 1 to 3 are)"
            )));
        }
        let flags_at = h.len();
        self.take(4, &mut h)?;
        let mut r = FieldReader::new(&h, header_at, "lzop header");
        r.skip(flags_at).map_err(|e| damaged(e.to_string()))?;
        let flags = r.u32_be().map_err(|e| damaged(e.to_string()))?;
        if flags & F_H_FILTER != 0 {
            return Err(damaged("the stream uses an lzop filter, which vma does not decode; use `lzop -d -c FILE | vma COMMAND -`".into()));
        }
        if flags & F_MULTIPART != 0 {
            return Err(damaged("multi-part lzop streams are not supported".into()));
        }
        // mode, mtime_low (and mtime_high), then the name.
        self.take(if new_layout { 12 } else { 8 }, &mut h)?;
        self.take(1, &mut h)?;
        let name_len = h[h.len() - 1] as usize;
        self.take(name_len, &mut h)?;
        let expected = self.u32()?;
        let found = if flags & F_H_CRC32 != 0 {
            crc32(&h)
        } else {
            adler32(1, &h)
        };
        if !crate::digest::check_matches(&expected.to_be_bytes(), &found.to_be_bytes()) {
            return Err(damaged(format!(
                "header checksum is {found:#010x}, the header records {expected:#010x}"
            )));
        }
        if flags & F_H_EXTRA_FIELD != 0 {
            let len = self.u32()? as usize;
            if len > MAX_EXTRA {
                return Err(damaged(format!("extra header field of {len} bytes")));
            }
            let mut extra = Vec::new();
            self.take(len, &mut extra)?;
            self.u32()?;
        }
        self.flags = flags;
        Ok(())
    }

    /// Decode the next block into `self.block`; false at the end of the stream.
    fn next_block(&mut self) -> io::Result<bool> {
        let at = self.offset;
        let dst_len = self.u32()? as usize;
        if dst_len == 0 {
            return Ok(false);
        }
        let src_len = self.u32()? as usize;
        if dst_len > MAX_BLOCK || src_len > dst_len {
            return Err(damaged(format!(
                "block at offset {at} claims {src_len} stored bytes for {dst_len} decoded (at most 64 MiB, never more stored than decoded)"
            )));
        }
        let sum_d = match self.flags & (F_ADLER32_D | F_CRC32_D) {
            0 => None,
            _ => Some(self.u32()?),
        };
        let compressed = src_len < dst_len;
        let sum_c = match (compressed, self.flags & (F_ADLER32_C | F_CRC32_C)) {
            (true, f) if f != 0 => Some(self.u32()?),
            _ => None,
        };
        let mut stored = std::mem::take(&mut self.stored);
        stored.clear();
        self.take(src_len, &mut stored)?;
        let check = |what: &str, data: &[u8], want: u32, adler: bool| -> io::Result<()> {
            let found = if adler { adler32(1, data) } else { crc32(data) };
            if crate::digest::check_matches(&want.to_be_bytes(), &found.to_be_bytes()) {
                Ok(())
            } else {
                Err(damaged(format!(
                    "block at offset {at}: {what} checksum is {found:#010x}, the stream records {want:#010x}"
                )))
            }
        };
        if let Some(want) = sum_c {
            check("stored", &stored, want, self.flags & F_ADLER32_C != 0)?;
        }
        self.block.clear();
        if compressed {
            self.block.resize(dst_len, 0);
            let n = lzo::decompress_into(&stored, &mut self.block)
                .map_err(|e| damaged(format!("block at offset {at}: {e}")))?;
            if n != dst_len {
                return Err(damaged(format!(
                    "block at offset {at} decodes to {n} bytes, not the {dst_len} it records"
                )));
            }
        } else {
            self.block.extend_from_slice(&stored);
        }
        if let Some(want) = sum_d {
            check("decoded", &self.block, want, self.flags & F_ADLER32_D != 0)?;
        }
        self.stored = stored;
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for LzopReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.block.len() {
            if self.done || !self.next_block()? {
                self.done = true;
                return Ok(0);
            }
        }
        let n = out.len().min(self.block.len() - self.pos);
        out[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::field::FieldWriter;

    #[test]
    fn adler32_known_answers() {
        assert_eq!(adler32(1, b""), 1);
        assert_eq!(adler32(1, b"Wikipedia"), 0x11E6_0398);
        // Long input: the reductions keep it exact.
        let big = vec![0xffu8; 100_000];
        let mut slow = (1u32, 0u32);
        for &b in &big {
            slow.0 = (slow.0 + b as u32) % 65_521;
            slow.1 = (slow.1 + slow.0) % 65_521;
        }
        assert_eq!(adler32(1, &big), (slow.1 << 16) | slow.0);
    }

    /// A stored-only lzop stream (no compression needed to build it).
    fn stored_stream(data: &[u8], flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        FieldWriter::new(&mut h)
            .u16_be(0x1040)
            .u16_be(0x20a0)
            .u16_be(0x0940)
            .bytes(&[1, 5])
            .u32_be(flags)
            .u32_be(0o100644)
            .zeros(8)
            .u8(1)
            .u8(b'x');
        let mut s = LZOP_MAGIC.to_vec();
        s.extend_from_slice(&h);
        let mut w = FieldWriter::new(&mut s);
        w.u32_be(adler32(1, &h));
        for chunk in data.chunks(1000) {
            w.u32_be(chunk.len() as u32).u32_be(chunk.len() as u32);
            if flags & F_ADLER32_D != 0 {
                w.u32_be(adler32(1, chunk));
            }
            w.bytes(chunk);
        }
        s.extend_from_slice(&[0; 4]);
        s
    }

    #[test]
    fn stored_blocks_read_back_and_damage_is_caught() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let s = stored_stream(&data, F_ADLER32_D);
        let mut out = Vec::new();
        LzopReader::new(&s[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        // Every flipped byte past the magic is an error: the header, the
        // block lengths and the data are all covered by a checksum.
        for i in 9..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x20;
            let result = LzopReader::new(&bad[..]).and_then(|mut r| {
                let mut out = Vec::new();
                r.read_to_end(&mut out).map(|_| out)
            });
            assert!(result.is_err(), "flip at {i} went unnoticed");
        }
        // Every truncation is an error.
        for cut in 0..s.len() {
            let result = LzopReader::new(&s[..cut]).and_then(|mut r| {
                let mut out = Vec::new();
                r.read_to_end(&mut out).map(|_| out)
            });
            assert!(result.is_err(), "cut at {cut} went unnoticed");
        }
    }
}

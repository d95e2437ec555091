//! Buffered input from any `Read` (file or pipe) that knows its absolute
//! offset and can peek ahead, so a sequential reader can look at magics
//! and resynchronise after damage without seeking.

use std::io::{ErrorKind, Read};

use crate::error::{Error, Result};

const BUF_SIZE: usize = 1 << 20;

/// A reader with a look-ahead buffer and an absolute position.
pub(crate) struct Input<R: Read> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    pos: u64,
    eof: bool,
    name: String,
}

impl<R: Read> Input<R> {
    pub(crate) fn new(inner: R, name: impl Into<String>) -> Self {
        Input {
            inner,
            buf: vec![0; BUF_SIZE],
            start: 0,
            end: 0,
            pos: 0,
            eof: false,
            name: name.into(),
        }
    }

    /// Absolute offset of the next unread byte.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Name used in error messages.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Up to `n` (at most 1 MiB) bytes ahead without consuming them; fewer only at end of input.
    pub(crate) fn peek(&mut self, n: usize) -> Result<&[u8]> {
        debug_assert!(n <= BUF_SIZE);
        if self.end - self.start < n && !self.eof {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < n && !self.eof {
                match self.inner.read(&mut self.buf[self.end..]) {
                    Ok(0) => self.eof = true,
                    Ok(k) => self.end += k,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(read_error(
                            &self.name,
                            self.pos + (self.end - self.start) as u64,
                            e,
                        ))
                    }
                }
            }
        }
        let have = (self.end - self.start).min(n);
        Ok(&self.buf[self.start..self.start + have])
    }

    /// Skip `n` bytes that were peeked.
    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.end - self.start);
        self.start += n;
        self.pos += n as u64;
    }

    /// Read exactly `n` bytes into a new vector; `what` names the structure
    /// for the truncation error. Allocation grows with the data actually
    /// present, so a huge declared length on a short input costs nothing.
    pub(crate) fn read_vec(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n.min(64 << 20));
        self.read_into(&mut out, n, what)?;
        Ok(out)
    }

    /// Append exactly `n` bytes to `out`.
    pub(crate) fn read_into(&mut self, out: &mut Vec<u8>, n: usize, what: &str) -> Result<()> {
        let start_pos = self.pos;
        let mut left = n;
        let buffered = (self.end - self.start).min(left);
        out.extend_from_slice(&self.buf[self.start..self.start + buffered]);
        self.consume(buffered);
        left -= buffered;
        while left > 0 {
            if self.eof {
                return Err(Error::truncated(
                    self.pos,
                    format!(
                        "{what} starting at offset {start_pos} needs {n} bytes; {} ends at offset {}",
                        self.name, self.pos
                    ),
                ));
            }
            if left >= BUF_SIZE {
                // Large reads go straight into the destination, which grows
                // with what arrives (at most doubling), not with what a
                // header declares.
                let old = out.len();
                let arrived = n - left;
                let chunk = left.min(16 << 20).min(arrived.max(BUF_SIZE));
                out.resize(old + chunk, 0);
                let mut got = 0;
                while got < chunk {
                    match self.inner.read(&mut out[old + got..old + chunk]) {
                        Ok(0) => {
                            self.eof = true;
                            break;
                        }
                        Ok(k) => got += k,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(read_error(&self.name, self.pos, e)),
                    }
                }
                out.truncate(old + got);
                self.pos += got as u64;
                left -= got;
            } else {
                let avail = self.peek(left)?.len();
                let s = self.start;
                out.extend_from_slice(&self.buf[s..s + avail]);
                self.consume(avail);
                left -= avail;
            }
        }
        Ok(())
    }

    /// Read an array of `N` bytes.
    pub(crate) fn read_array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.read_vec(N, what)?;
        Ok(v.try_into().expect("exact length"))
    }

    /// True when no byte is left.
    pub(crate) fn at_eof(&mut self) -> Result<bool> {
        Ok(self.peek(1)?.is_empty())
    }
}

/// A read error: damage when the data itself is bad (a decompressor said
/// so), an I/O error otherwise.
fn read_error(name: &str, offset: u64, e: std::io::Error) -> Error {
    if e.kind() == ErrorKind::InvalidData {
        Error::corrupt(offset, format!("reading {name}: {e}"))
    } else {
        Error::io(format!("reading {name} at offset {offset}"), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short input behind a huge declared length: the header reader once
    /// zeroed 16 MiB for a 64 MiB header before finding the input 2 MiB
    /// long; now the buffer stays within twice what arrived.
    #[test]
    fn a_huge_declared_length_allocates_only_what_arrives() {
        let data = vec![7u8; 2 << 20];
        let mut input = Input::new(&data[..], "short");
        let mut out = Vec::new();
        let err = input.read_into(&mut out, 64 << 20, "header").unwrap_err();
        assert!(
            matches!(err, Error::Truncated { offset, .. } if offset == 2 << 20),
            "{err}"
        );
        assert_eq!(out.len(), 2 << 20);
        assert!(out.capacity() <= 5 << 20, "capacity {}", out.capacity());
    }

    /// Offsets in messages are absolute file offsets: a structure cut
    /// short says where the input ends, not how far into the structure
    /// (once "ends after 32", a count that read like an offset).
    #[test]
    fn a_short_structure_names_absolute_offsets() {
        let data = vec![1u8; 790];
        let mut input = Input::new(&data[..], "a.vma");
        input.read_vec(758, "extents").unwrap();
        let err = input.read_vec(120, "index directory").unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, Error::Truncated { offset: 790, .. }),
            "{text}"
        );
        assert!(
            text.contains(
                "index directory starting at offset 758 needs 120 bytes; a.vma ends at offset 790"
            ),
            "{text}"
        );
        assert!(!text.contains("ends after"), "{text}");
    }

    #[test]
    fn large_reads_are_exact() {
        let data: Vec<u8> = (0..(40u32 << 20) / 4)
            .flat_map(|i| i.to_le_bytes())
            .collect();
        let mut input = Input::new(&data[..], "long");
        assert_eq!(input.read_vec(3, "a").unwrap(), data[..3]);
        let big = input.read_vec(data.len() - 5, "b").unwrap();
        assert_eq!(big, data[3..data.len() - 2]);
        assert_eq!(input.pos(), data.len() as u64 - 2);
        assert_eq!(input.read_vec(2, "c").unwrap(), data[data.len() - 2..]);
        assert!(input.at_eof().unwrap());
    }
}

//! A writer that counts the bytes through it.

use std::io::{self, Write};

/// A writer that passes everything to the one inside and counts the bytes
/// it accepted.
pub struct Counting<W: Write> {
    inner: W,
    count: u64,
}

impl<W: Write> Counting<W> {
    /// Count the bytes written through `inner`, from 0.
    pub fn new(inner: W) -> Counting<W> {
        Counting { inner, count: 0 }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The writer inside.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_the_inner_writer_accepts() {
        let mut out = Counting::new(Vec::new());
        out.write_all(b"hello").unwrap();
        write!(out, " {}", 42).unwrap();
        assert_eq!(out.count(), 8);
        assert_eq!(out.into_inner(), b"hello 42");
    }
}

//! Sorted spools: records that arrive in any order, kept in sorted chunks in
//! memory up to a bound and spilled beyond it to an unnamed temporary file
//! (in `TMPDIR`), then read back in order through a k-way merge, as often
//! as needed. This is what keeps the index builder's memory bounded
//! whatever the number of runs, extents and leaves.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

/// A fixed-size record with a total order.
pub(crate) trait Record: Copy + Ord {
    /// Encoded length in bytes.
    const LEN: usize;
    /// Encode into `out` (exactly [`Record::LEN`] bytes).
    fn put(&self, out: &mut [u8]);
    /// Decode from `b` (exactly [`Record::LEN`] bytes).
    fn get(b: &[u8]) -> Self;
}

/// At most this many chunks are merged at once; more are merged in rounds.
const MAX_FAN_IN: usize = 64;
/// Bytes read from a chunk at a time while merging.
const READ_BUF: usize = 64 << 10;

/// An unnamed temporary file (removed by the system when closed).
pub(crate) fn temp_file() -> Result<File> {
    tempfile::tempfile().map_err(|e| {
        Error::io(
            "creating a temporary file (in TMPDIR, or /tmp) for the index",
            e,
        )
    })
}

/// Records in sorted chunks: the newest chunk in memory, older ones in a
/// temporary file.
pub(crate) struct Spool<T: Record> {
    mem: Vec<T>,
    limit: usize,
    file: Option<File>,
    end: u64,
    /// (offset, record count) of each sorted chunk in the file.
    chunks: Vec<(u64, u64)>,
    sorted: bool,
}

impl<T: Record> Spool<T> {
    /// A spool keeping at most about `bytes` of records in memory.
    pub(crate) fn new(bytes: usize) -> Self {
        let limit = (bytes / std::mem::size_of::<T>().max(1)).max(1024);
        Spool {
            mem: Vec::new(),
            limit,
            file: None,
            end: 0,
            chunks: Vec::new(),
            sorted: true,
        }
    }

    /// Add a record.
    pub(crate) fn push(&mut self, r: T) -> Result<()> {
        if self.sorted {
            if let Some(last) = self.mem.last() {
                self.sorted = *last <= r;
            }
        }
        self.mem.push(r);
        if self.mem.len() >= self.limit {
            self.spill()?;
        }
        Ok(())
    }

    fn file(&mut self) -> Result<&File> {
        if self.file.is_none() {
            self.file = Some(temp_file()?);
        }
        Ok(self.file.as_ref().expect("just created"))
    }

    /// Sort what is in memory and write it as one chunk.
    fn spill(&mut self) -> Result<()> {
        if self.mem.is_empty() {
            return Ok(());
        }
        if !self.sorted {
            self.mem.sort_unstable();
        }
        let mut buf = vec![0u8; (1 << 20) / T::LEN * T::LEN];
        let start = self.end;
        let mut at = start;
        let mem = std::mem::take(&mut self.mem);
        for part in mem.chunks(buf.len() / T::LEN) {
            for (i, r) in part.iter().enumerate() {
                r.put(&mut buf[i * T::LEN..(i + 1) * T::LEN]);
            }
            let n = part.len() * T::LEN;
            self.file()?
                .write_all_at(&buf[..n], at)
                .map_err(|e| Error::io("writing the index builder's temporary file", e))?;
            at += n as u64;
        }
        self.chunks.push((start, mem.len() as u64));
        self.end = at;
        self.mem = mem;
        self.mem.clear();
        self.sorted = true;
        Ok(())
    }

    /// Prepare for reading: sort the records in memory and, when the file
    /// holds more chunks than are merged at once, merge them in rounds.
    pub(crate) fn seal(&mut self) -> Result<()> {
        if !self.sorted {
            self.mem.sort_unstable();
            self.sorted = true;
        }
        while self.chunks.len() > MAX_FAN_IN {
            let mut merged = Vec::new();
            let groups: Vec<Vec<(u64, u64)>> =
                self.chunks.chunks(MAX_FAN_IN).map(|g| g.to_vec()).collect();
            for group in groups {
                let start = self.end;
                let file = self.file.as_ref().expect("chunks live in the file");
                let mut iter: Merge<'_, T> = Merge::new(file, &group, &[])?;
                let mut buf = Vec::with_capacity(1 << 20);
                let mut at = start;
                let mut count = 0u64;
                let mut rec = vec![0u8; T::LEN];
                while let Some(r) = iter.next_record()? {
                    r.put(&mut rec);
                    buf.extend_from_slice(&rec);
                    count += 1;
                    if buf.len() >= 1 << 20 {
                        file.write_all_at(&buf, at).map_err(|e| {
                            Error::io("writing the index builder's temporary file", e)
                        })?;
                        at += buf.len() as u64;
                        buf.clear();
                    }
                }
                file.write_all_at(&buf, at)
                    .map_err(|e| Error::io("writing the index builder's temporary file", e))?;
                at += buf.len() as u64;
                self.end = at;
                merged.push((start, count));
            }
            self.chunks = merged;
        }
        Ok(())
    }

    /// Every record in order (after [`Spool::seal`]).
    pub(crate) fn iter(&self) -> Result<Merge<'_, T>> {
        debug_assert!(self.sorted);
        match &self.file {
            Some(f) => Merge::new(f, &self.chunks, &self.mem),
            None => Merge::new_mem(&self.mem),
        }
    }
}

/// One sorted source of a merge.
enum Source<'a, T> {
    Mem(&'a [T], usize),
    File {
        file: &'a File,
        pos: u64,
        left: u64,
        buf: Vec<u8>,
        at: usize,
    },
}

impl<T: Record> Source<'_, T> {
    fn next(&mut self) -> Result<Option<T>> {
        match self {
            Source::Mem(s, i) => {
                let r = s.get(*i).copied();
                *i += 1;
                Ok(r)
            }
            Source::File {
                file,
                pos,
                left,
                buf,
                at,
            } => {
                if *at == buf.len() {
                    if *left == 0 {
                        return Ok(None);
                    }
                    let n = (*left).min((READ_BUF / T::LEN) as u64);
                    buf.resize(n as usize * T::LEN, 0);
                    file.read_exact_at(buf, *pos)
                        .map_err(|e| Error::io("reading the index builder's temporary file", e))?;
                    *pos += buf.len() as u64;
                    *left -= n;
                    *at = 0;
                }
                let r = T::get(&buf[*at..*at + T::LEN]);
                *at += T::LEN;
                Ok(Some(r))
            }
        }
    }
}

/// A k-way merge of sorted sources.
pub(crate) struct Merge<'a, T: Record> {
    sources: Vec<Source<'a, T>>,
    heap: BinaryHeap<Reverse<(T, usize)>>,
    peeked: Option<T>,
}

impl<'a, T: Record> Merge<'a, T> {
    fn new_mem(mem: &'a [T]) -> Result<Self> {
        let mut m = Merge {
            sources: vec![Source::Mem(mem, 0)],
            heap: BinaryHeap::new(),
            peeked: None,
        };
        m.prime()?;
        Ok(m)
    }

    fn new(file: &'a File, chunks: &[(u64, u64)], mem: &'a [T]) -> Result<Self> {
        let mut sources: Vec<Source<'a, T>> = chunks
            .iter()
            .map(|&(pos, left)| Source::File {
                file,
                pos,
                left,
                buf: Vec::new(),
                at: 0,
            })
            .collect();
        sources.push(Source::Mem(mem, 0));
        let mut m = Merge {
            sources,
            heap: BinaryHeap::new(),
            peeked: None,
        };
        m.prime()?;
        Ok(m)
    }

    fn prime(&mut self) -> Result<()> {
        for i in 0..self.sources.len() {
            if let Some(r) = self.sources[i].next()? {
                self.heap.push(Reverse((r, i)));
            }
        }
        Ok(())
    }

    /// The next record in order.
    pub(crate) fn next_record(&mut self) -> Result<Option<T>> {
        if let Some(r) = self.peeked.take() {
            return Ok(Some(r));
        }
        let Some(Reverse((r, i))) = self.heap.pop() else {
            return Ok(None);
        };
        if let Some(n) = self.sources[i].next()? {
            self.heap.push(Reverse((n, i)));
        }
        Ok(Some(r))
    }

    /// The next record without taking it.
    pub(crate) fn peek(&mut self) -> Result<Option<&T>> {
        if self.peeked.is_none() {
            self.peeked = self.next_record()?;
        }
        Ok(self.peeked.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Record for u64 {
        const LEN: usize = 8;
        fn put(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.to_le_bytes());
        }
        fn get(b: &[u8]) -> Self {
            u64::from_le_bytes(b.try_into().unwrap())
        }
    }

    #[test]
    fn spills_and_merges_in_rounds() {
        // 8 KiB of memory: at least 1024 records per chunk, so 300 000
        // records make about 290 chunks, merged in rounds of 64.
        let mut s: Spool<u64> = Spool::new(8 << 10);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut all = Vec::new();
        for _ in 0..300_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = x % 100_000;
            s.push(v).unwrap();
            all.push(v);
        }
        assert!(s.chunks.len() > MAX_FAN_IN);
        s.seal().unwrap();
        assert!(s.chunks.len() <= MAX_FAN_IN);
        all.sort_unstable();
        for _ in 0..2 {
            let mut it = s.iter().unwrap();
            let mut got = Vec::new();
            while let Some(v) = it.next_record().unwrap() {
                got.push(v);
            }
            assert_eq!(got, all);
        }
    }

    #[test]
    fn small_spools_stay_in_memory() {
        let mut s: Spool<u64> = Spool::new(1 << 20);
        for v in [5, 3, 9, 1] {
            s.push(v).unwrap();
        }
        s.seal().unwrap();
        assert!(s.file.is_none());
        let mut it = s.iter().unwrap();
        assert_eq!(it.peek().unwrap(), Some(&1));
        let mut got = Vec::new();
        while let Some(v) = it.next_record().unwrap() {
            got.push(v);
        }
        assert_eq!(got, vec![1, 3, 5, 9]);
    }
}

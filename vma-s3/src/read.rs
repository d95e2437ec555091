//! An object read with ranged GETs: the tail (footer and index) by one
//! suffix request at open; a sequential reader (extract, verify, a
//! mount's read-ahead) gets 1 MiB blocks fetched in parallel (adjacent
//! missing blocks coalesced into one request of up to 4 MiB), read ahead
//! and kept in a cache bounded by bytes; a random read that misses the
//! cache (an extent a mount or an export asks for) is fetched as exactly
//! its byte range, one request, not kept (the reader caches the decoded
//! extent).

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use crate::{block_on, bucket, runtime, store_error, Bucket, Error, Location};

/// Bytes of one cached block.
pub const BLOCK: u64 = 1 << 20;
/// Most blocks fetched by one request.
const COALESCE: u64 = 4;
/// Blocks read ahead of a sequential reader.
const READ_AHEAD: u64 = 24;
/// Blocks kept (48 MiB), read-ahead included.
const CACHE_BLOCKS: usize = 48;
/// Longest single GET of a random read; longer ones are split and fetched
/// in parallel.
const EXACT_PART: u64 = 4 << 20;
/// Bytes of the tail fetched at open (footer, index fixed part and more).
const TAIL: u64 = 1 << 20;
/// Attempts of a ranged GET (each with the client's own retries inside).
const ATTEMPTS: u32 = 3;

enum State {
    Pending,
    Ready(Bytes),
    Failed(String),
}

struct Slot {
    state: Mutex<State>,
    ready: Condvar,
    used: AtomicU64,
}

impl Slot {
    fn wait(&self) -> Result<Bytes, String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*s {
                State::Pending => s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner()),
                State::Ready(b) => return Ok(b.clone()),
                State::Failed(e) => return Err(e.clone()),
            }
        }
    }
    fn set(&self, v: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = v;
        self.ready.notify_all();
    }
}

/// An object opened for random access (a [`vma_core::storage::ReadAt`]).
pub struct ObjectSource {
    loc: Location,
    bucket: Arc<Bucket>,
    size: u64,
    tail: Bytes,
    blocks: Mutex<HashMap<u64, Arc<Slot>>>,
    clock: AtomicU64,
    /// Where the last read ended (sequential detection).
    last_end: AtomicU64,
    /// Reads in a row that started where an earlier one ended.
    streak: AtomicU64,
}

impl ObjectSource {
    /// Open `loc`: one suffix GET gives its size and its tail.
    pub fn open(loc: &Location) -> Result<ObjectSource, Error> {
        let b = bucket(loc)?;
        let opts = GetOptions {
            range: Some(GetRange::Suffix(TAIL)),
            ..Default::default()
        };
        let (size, tail) = block_on(async {
            let r = b.store.get_opts(&loc.obj(), opts).await?;
            let size = r.meta.size;
            let bytes = r.bytes().await?;
            Ok::<_, object_store::Error>((size, bytes))
        })
        .map_err(|e| store_error(loc, None, "GET of the last MiB", e))?;
        Ok(ObjectSource {
            loc: loc.clone(),
            bucket: b,
            size,
            tail,
            blocks: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            last_end: AtomicU64::new(u64::MAX),
            streak: AtomicU64::new(0),
        })
    }

    /// The object's size.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// True for an empty object.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    fn block_range(&self, b: u64) -> Range<u64> {
        b * BLOCK..((b + 1) * BLOCK).min(self.size)
    }

    /// Slots for blocks `want`, starting the fetches of missing ones.
    fn ensure(&self, want: Range<u64>) -> Vec<Arc<Slot>> {
        let mut map = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut missing: Vec<u64> = Vec::new();
        for b in want.clone() {
            let slot = map.entry(b).or_insert_with(|| {
                missing.push(b);
                Arc::new(Slot {
                    state: Mutex::new(State::Pending),
                    ready: Condvar::new(),
                    used: AtomicU64::new(0),
                })
            });
            slot.used.store(
                self.clock.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            out.push(slot.clone());
        }
        // Bounded: drop the least recently used finished blocks.
        while map.len() > CACHE_BLOCKS {
            let victim = map
                .iter()
                .filter(|(k, s)| {
                    !want.contains(k)
                        && !matches!(
                            *s.state.lock().unwrap_or_else(|e| e.into_inner()),
                            State::Pending
                        )
                })
                .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    map.remove(&k);
                }
                None => break,
            }
        }
        // Coalesce consecutive missing blocks, up to COALESCE per request.
        let mut groups: Vec<Vec<u64>> = Vec::new();
        for b in missing {
            match groups.last_mut() {
                Some(g) if *g.last().unwrap() + 1 == b && (g.len() as u64) < COALESCE => g.push(b),
                _ => groups.push(vec![b]),
            }
        }
        for g in groups {
            let slots: Vec<Arc<Slot>> = g.iter().map(|b| map[b].clone()).collect();
            let range = self.block_range(g[0]).start..self.block_range(*g.last().unwrap()).end;
            let store = self.bucket.store.clone();
            let loc = self.loc.clone();
            runtime().spawn(async move {
                let result = get_range(&store, &loc, range.clone()).await;
                match result {
                    Ok(bytes) => {
                        for (i, s) in slots.iter().enumerate() {
                            let start = (i as u64 * BLOCK) as usize;
                            let end = ((i as u64 + 1) * BLOCK).min(bytes.len() as u64) as usize;
                            if start >= end {
                                s.set(State::Failed(format!(
                                    "{loc} bytes {}..{}: the store returned {} bytes",
                                    range.start,
                                    range.end,
                                    bytes.len()
                                )));
                            } else {
                                // A copy of its own: an evicted block frees its memory
                                // even while a neighbour of the same request stays.
                                s.set(State::Ready(Bytes::copy_from_slice(&bytes[start..end])));
                            }
                        }
                    }
                    Err(e) => {
                        for s in &slots {
                            s.set(State::Failed(e.to_string()));
                        }
                    }
                }
            });
        }
        out
    }

    /// True when every block of `blocks` is cached or being fetched.
    fn cached(&self, blocks: Range<u64>) -> bool {
        let map = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        blocks.into_iter().all(|b| map.contains_key(&b))
    }

    /// Bytes `offset..offset + buf.len()` by one ranged GET of exactly
    /// them (parallel GETs of [`EXACT_PART`] for a long range).
    fn fetch_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let store = self.bucket.store.clone();
        let loc = self.loc.clone();
        let parts: Vec<Range<u64>> = (offset..end)
            .step_by(EXACT_PART as usize)
            .map(|s| s..(s + EXACT_PART).min(end))
            .collect();
        let got = block_on(async {
            let tasks: Vec<_> = parts
                .iter()
                .map(|r| {
                    let (store, loc, r) = (store.clone(), loc.clone(), r.clone());
                    runtime().spawn(async move { get_range(&store, &loc, r).await })
                })
                .collect();
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(
                    t.await
                        .map_err(|e| store_error(&loc, Some(offset..end), "GET", e))
                        .and_then(|r| r),
                );
            }
            out
        });
        for (r, bytes) in parts.iter().zip(got) {
            let bytes = bytes.map_err(io::Error::other)?;
            let s = (r.start - offset) as usize;
            buf[s..s + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(())
    }

    fn forget(&self, blocks: Range<u64>) {
        let mut map = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        for b in blocks {
            if let Some(s) = map.get(&b) {
                if matches!(
                    *s.state.lock().unwrap_or_else(|e| e.into_inner()),
                    State::Failed(_)
                ) {
                    map.remove(&b);
                }
            }
        }
    }
}

/// A ranged GET with its length checked, tried [`ATTEMPTS`] times with backoff.
async fn get_range(
    store: &object_store::aws::AmazonS3,
    loc: &Location,
    range: Range<u64>,
) -> Result<Bytes, Error> {
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match store.get_range(&loc.obj(), range.clone()).await {
            Ok(b) if b.len() as u64 == range.end - range.start => return Ok(b),
            Ok(b) => {
                last = Some(store_error(
                    loc,
                    Some(range.clone()),
                    "GET",
                    format!("{} bytes returned", b.len()),
                ))
            }
            Err(e @ object_store::Error::NotFound { .. }) => {
                return Err(store_error(loc, Some(range), "GET", e))
            }
            Err(e) => last = Some(store_error(loc, Some(range.clone()), "GET", e)),
        }
    }
    Err(last.expect("tried"))
}

impl vma_core::storage::ReadAt for ObjectSource {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_range(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} ends at {} bytes", self.loc, self.size),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let tail_start = self.size - self.tail.len() as u64;
        if offset >= tail_start {
            let s = (offset - tail_start) as usize;
            buf.copy_from_slice(&self.tail[s..s + buf.len()]);
            return Ok(());
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let near = {
            let prev = self.last_end.swap(end, Ordering::Relaxed);
            prev != u64::MAX && offset <= prev + BLOCK && offset + BLOCK >= prev
        };
        // Two reads in a row near where the one before ended: a pass.
        let sequential = if near {
            self.streak.fetch_add(1, Ordering::Relaxed) >= 1
        } else {
            self.streak.store(0, Ordering::Relaxed);
            false
        };
        if !sequential && !self.cached(first..last + 1) {
            return self.fetch_exact(buf, offset);
        }
        let blocks_total = self.size.div_ceil(BLOCK);
        let ahead = if sequential {
            (last + 1 + READ_AHEAD).min(blocks_total)
        } else {
            last + 1
        };
        let slots = self.ensure(first..ahead.max(last + 1));
        for (i, b) in (first..=last).enumerate() {
            // A failed block (read ahead, perhaps long ago) is fetched once more.
            let data = match slots[i].wait() {
                Ok(d) => d,
                Err(_) => {
                    self.forget(b..b + 1);
                    let again = self.ensure(b..b + 1);
                    again[0].wait().map_err(|e| {
                        self.forget(b..b + 1);
                        io::Error::other(e)
                    })?
                }
            };
            let r = self.block_range(b);
            let s = offset.max(r.start);
            let e = end.min(r.end);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            dst.copy_from_slice(&data[(s - r.start) as usize..(e - r.start) as usize]);
        }
        Ok(())
    }
}

//! An ordered parallel map: items go to worker threads and come back in
//! submission order, with a bound on how many are in flight. The writer
//! compresses extents with it and readers decode them; output order never
//! depends on thread timing.

use std::collections::BTreeMap;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::error::{Error, Result};

/// Worker threads applying a per-thread function, results reordered.
pub(crate) struct OrderedPool<I: Send + 'static, O: Send + 'static> {
    tx: Option<Sender<(u64, I)>>,
    rx: Receiver<(u64, O)>,
    pending: BTreeMap<u64, O>,
    next_in: u64,
    next_out: u64,
    max_in_flight: usize,
    workers: Vec<JoinHandle<()>>,
}

impl<I: Send + 'static, O: Send + 'static> OrderedPool<I, O> {
    /// Start `threads` workers; each calls `make_worker()` once for its own
    /// state (a compressor, say) and then applies it to items.
    pub(crate) fn new<F, W>(threads: usize, max_in_flight: usize, make_worker: F) -> Self
    where
        F: Fn() -> W,
        W: FnMut(I) -> O + Send + 'static,
    {
        let threads = threads.max(1);
        let max_in_flight = max_in_flight.max(threads);
        let (tx, work_rx) = bounded::<(u64, I)>(max_in_flight);
        let (done_tx, rx) = bounded::<(u64, O)>(max_in_flight);
        let workers = (0..threads)
            .map(|i| {
                let work_rx = work_rx.clone();
                let done_tx = done_tx.clone();
                let mut work = make_worker();
                std::thread::Builder::new()
                    .name(format!("vma-worker-{i}"))
                    .spawn(move || {
                        while let Ok((seq, item)) = work_rx.recv() {
                            if done_tx.send((seq, work(item))).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        OrderedPool {
            tx: Some(tx),
            rx,
            pending: BTreeMap::new(),
            next_in: 0,
            next_out: 0,
            max_in_flight,
            workers,
        }
    }

    fn in_flight(&self) -> usize {
        (self.next_in - self.next_out) as usize
    }

    /// Wait for the next output in order, if any is in flight.
    fn wait_next(&mut self) -> Result<Option<O>> {
        if self.in_flight() == 0 {
            return Ok(None);
        }
        loop {
            if let Some(o) = self.pending.remove(&self.next_out) {
                self.next_out += 1;
                return Ok(Some(o));
            }
            let (seq, o) = self
                .rx
                .recv()
                .map_err(|_| Error::Invalid("a worker thread stopped unexpectedly".into()))?;
            self.pending.insert(seq, o);
        }
    }

    /// Hand outputs that are ready, in order, to `handle` without waiting.
    fn drain_ready(&mut self, handle: &mut impl FnMut(O) -> Result<()>) -> Result<()> {
        while let Ok((seq, o)) = self.rx.try_recv() {
            self.pending.insert(seq, o);
        }
        while let Some(o) = self.pending.remove(&self.next_out) {
            self.next_out += 1;
            handle(o)?;
        }
        Ok(())
    }

    /// Submit one item; hand every output that is ready (in order) to
    /// `handle`, waiting while too many items are in flight.
    pub(crate) fn submit(
        &mut self,
        item: I,
        mut handle: impl FnMut(O) -> Result<()>,
    ) -> Result<()> {
        while self.in_flight() >= self.max_in_flight {
            match self.wait_next()? {
                Some(o) => handle(o)?,
                None => break,
            }
        }
        let tx = self.tx.as_ref().expect("pool used after finish");
        tx.send((self.next_in, item))
            .map_err(|_| Error::Invalid("worker threads stopped unexpectedly".into()))?;
        self.next_in += 1;
        self.drain_ready(&mut handle)
    }

    /// Wait for everything in flight and hand it to `handle` in order.
    pub(crate) fn finish(&mut self, mut handle: impl FnMut(O) -> Result<()>) -> Result<()> {
        while let Some(o) = self.wait_next()? {
            handle(o)?;
        }
        Ok(())
    }
}

impl<I: Send + 'static, O: Send + 'static> Drop for OrderedPool<I, O> {
    fn drop(&mut self) {
        self.tx = None;
        // Unblock workers waiting to send results.
        while self.rx.try_recv().is_ok() {}
        for w in self.workers.drain(..) {
            // Keep draining so no worker blocks on a full result channel.
            while !w.is_finished() {
                let _ = self.rx.recv_timeout(std::time::Duration::from_millis(1));
            }
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_under_uneven_work() {
        let mut pool = OrderedPool::new(4, 8, || {
            |x: u64| {
                std::thread::sleep(std::time::Duration::from_micros((x * 7919) % 500));
                x * 2
            }
        });
        let mut out = Vec::new();
        for i in 0..200 {
            pool.submit(i, |o| {
                out.push(o);
                Ok(())
            })
            .unwrap();
        }
        pool.finish(|o| {
            out.push(o);
            Ok(())
        })
        .unwrap();
        assert_eq!(out, (0..200).map(|i| i * 2).collect::<Vec<_>>());
    }
}

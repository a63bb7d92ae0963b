//! `ReadAhead`: notices sequential reads and loads the blocks after them before they are asked for.
//!
//! Each sequential read doubles a window (bounded by a quarter of the cache and 64 MiB) of
//! blocks to load ahead of the reader; the blocks go into a queue that long-lived workers, as
//! many as the volume's concurrency, take one at a time. So a sequential reader keeps
//! `concurrency` GETs in flight for as long as it reads, without the gap that waiting for a whole
//! batch leaves at its tail. A read elsewhere (a seek) empties the queue: those blocks are no
//! longer wanted.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Duration;

use super::Volume;
use crate::lock;
use crate::storage::BlockId;

/// Sequential-read detection and the queue of blocks to load ahead.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    detector: Mutex<Detector>,
    /// Blocks to load, nearest first.
    queue: Mutex<VecDeque<BlockId>>,
    /// Signalled when blocks are queued.
    queued: Condvar,
    /// The workers start with the first sequential read, which is after nbdkit forks.
    workers: OnceLock<()>,
}

/// Where the last read ended and how far ahead of it blocks are queued.
#[derive(Debug, Default)]
struct Detector {
    /// The byte after the last read; a read starting here is sequential.
    next: u64,
    /// Bytes to load ahead; doubles with each sequential read up to a bound, 0 after a seek.
    window: u64,
    /// Everything before this offset has been queued already.
    queued_until: u64,
}

impl ReadAhead {
    /// After a read of `len` bytes at `offset` of `volume`: if reads are sequential, queues the
    /// blocks of the window after it that are not queued yet.
    pub(crate) fn after_read(&self, volume: &Arc<Volume>, offset: u64, len: u64) {
        let workers = volume.config.concurrency;
        if workers < 2 {
            return; // memory storage: nothing to hide
        }
        let bs = volume.geometry.block_size() as u64;
        let max = (volume.cache.capacity() as u64 * bs / 4).min(64 << 20);
        let end = offset + len;
        let (from, to) = {
            let mut d = lock(&self.detector);
            let sequential = offset == d.next && offset != 0;
            d.next = end;
            if !sequential {
                d.window = 0;
                d.queued_until = 0;
                lock(&self.queue).clear();
                return;
            }
            d.window = (d.window * 2).clamp(len.max(bs) * 2, max.max(bs));
            let from = d.queued_until.max(end).next_multiple_of(bs);
            let to = (end + d.window).min(volume.geometry.size());
            if from >= to {
                return;
            }
            d.queued_until = to;
            (from, to)
        };
        self.workers.get_or_init(|| self.start_workers(Arc::downgrade(volume), workers));
        lock(&self.queue).extend((from / bs..to.div_ceil(bs)).map(BlockId));
        self.queued.notify_all();
    }

    fn start_workers(&self, volume: Weak<Volume>, n: usize) {
        for _ in 0..n {
            let volume = volume.clone();
            let spawned = std::thread::Builder::new().name("nbds3-readahead".into()).spawn(move || loop {
                let Some(v) = volume.upgrade() else { return };
                let next = {
                    let queue = lock(&v.read_ahead.queue);
                    let (mut queue, _) = v
                        .read_ahead
                        .queued
                        .wait_timeout_while(queue, Duration::from_secs(1), |q| q.is_empty())
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    queue.pop_front()
                };
                if let Some(id) = next {
                    if let Err(e) = v.cache.prefetch(std::iter::once(id), 1) {
                        log::debug!("read-ahead of block {id} failed: {e}");
                    }
                }
            });
            if let Err(e) = spawned {
                log::warn!("cannot start a read-ahead worker: {e}");
            }
        }
    }
}

//! `MeteredStorage`: counts every request that reaches a store, with bytes and latency, so
//! operators (and the benchmark) can see what each workload costs in S3 requests.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use super::{BlockBuf, BlockId, Capabilities, Storage};
use crate::Result;

/// Request counters of one store.
#[derive(Debug, Default)]
pub struct StorageStats {
    /// Block reads (S3 GET).
    pub gets: AtomicU64,
    /// Block writes (S3 PUT).
    pub puts: AtomicU64,
    /// Blocks deleted (S3 DELETE, or keys in a DeleteObjects batch).
    pub deletes: AtomicU64,
    /// Batch delete requests.
    pub delete_batches: AtomicU64,
    /// Listings of the stored blocks.
    pub lists: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Bytes read from storage.
    pub bytes_down: AtomicU64,
    /// Bytes written to storage.
    pub bytes_up: AtomicU64,
    /// Total time spent in writes, in microseconds.
    pub put_micros: AtomicU64,
}

impl StorageStats {
    /// The counters by name, in the stats file's order; `put_avg_us` is the mean write time.
    pub fn counters(&self) -> [(&'static str, u64); 9] {
        let puts = self.puts.load(Relaxed);
        [
            ("gets", self.gets.load(Relaxed)),
            ("puts", puts),
            ("deletes", self.deletes.load(Relaxed)),
            ("delete_batches", self.delete_batches.load(Relaxed)),
            ("lists", self.lists.load(Relaxed)),
            ("errors", self.errors.load(Relaxed)),
            ("bytes_down", self.bytes_down.load(Relaxed)),
            ("bytes_up", self.bytes_up.load(Relaxed)),
            ("put_avg_us", self.put_micros.load(Relaxed).checked_div(puts).unwrap_or(0)),
        ]
    }
}

/// Wraps a store, counting the requests that pass through.
#[derive(Debug)]
pub struct MeteredStorage {
    inner: Arc<dyn Storage>,
    /// The counters.
    pub stats: StorageStats,
}

impl MeteredStorage {
    /// Counts the requests to `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        MeteredStorage { inner, stats: StorageStats::default() }
    }

    /// The counters by name, in the stats file's order, with the store's retries.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.stats.counters().into_iter().chain([("retries", self.inner.retries())]).collect()
    }

    fn count<T>(&self, counter: &AtomicU64, n: u64, result: Result<T>) -> Result<T> {
        counter.fetch_add(n, Relaxed);
        if result.is_err() {
            self.stats.errors.fetch_add(1, Relaxed);
        }
        result
    }
}

impl fmt::Display for MeteredStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Storage for MeteredStorage {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool> {
        let result = self.inner.read_block(id, buf);
        if let Ok(true) = result {
            self.stats.bytes_down.fetch_add(buf.len() as u64, Relaxed);
        }
        self.count(&self.stats.gets, 1, result)
    }

    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.write_block(id, data);
        if result.is_ok() {
            self.stats.bytes_up.fetch_add(data.len() as u64, Relaxed);
            self.stats.put_micros.fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        }
        self.count(&self.stats.puts, 1, result)
    }

    fn delete_block(&self, id: BlockId) -> Result<()> {
        let result = self.inner.delete_block(id);
        self.count(&self.stats.deletes, 1, result)
    }

    fn delete_blocks(&self, ids: &[BlockId]) -> Result<()> {
        self.stats.delete_batches.fetch_add(1, Relaxed);
        let result = self.inner.delete_blocks(ids);
        self.count(&self.stats.deletes, ids.len() as u64, result)
    }

    fn list_blocks(&self) -> Result<Vec<BlockId>> {
        let result = self.inner.list_blocks();
        self.count(&self.stats.lists, 1, result)
    }

    fn list_blocks_in(&self, range: std::ops::Range<u64>) -> Result<Vec<BlockId>> {
        let result = self.inner.list_blocks_in(range);
        self.count(&self.stats.lists, 1, result)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn retries(&self) -> u64 {
        self.inner.retries()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{conformance, MemoryStorage};

    #[test]
    fn conformance_and_counts() {
        conformance::run_all(
            &|_| Box::new(MeteredStorage::new(Arc::new(MemoryStorage::new(conformance::BLOCK_SIZE)))),
            false,
        );
        let s = MeteredStorage::new(Arc::new(MemoryStorage::new(512)));
        s.write_block(BlockId(1), &[1; 512]).unwrap();
        s.read_block(BlockId(1), &mut BlockBuf::zeroed(512)).unwrap();
        s.read_block(BlockId(2), &mut BlockBuf::zeroed(512)).unwrap();
        s.delete_blocks(&[BlockId(1), BlockId(2)]).unwrap();
        assert!(s.write_block(BlockId(1), &[1; 3]).is_err());
        let counted = s.stats.counters();
        assert_eq!(
            counted.get(..8).unwrap(),
            [
                ("gets", 2),
                ("puts", 2),
                ("deletes", 2),
                ("delete_batches", 1),
                ("lists", 0),
                ("errors", 1),
                ("bytes_down", 512),
                ("bytes_up", 512)
            ]
        );
        assert_eq!(s.counters().last(), Some(&("retries", 0)));
    }
}

//! `Volume`: the byte-addressed device of one export, built from whole blocks.
//!
//! It splits each request into per-block pieces ([`geometry`]), hands them to the
//! [`BlockCache`], and decides when data must reach storage: on FLUSH, on FUA, and early when
//! too many blocks are dirty. All connections to one export share one `Volume`, so a FLUSH on one
//! connection covers writes made on every other.
//!
//! A panic in one of its background threads (the writer, the stream workers) fails the volume:
//! from then on writes, zeroes and FLUSH return EIO naming the thread that died, and nothing more
//! is written back, since a panic may have left a block's state half-changed (the per-block locks
//! ignore poisoning) and storing it could turn one bug into silent corruption; the client learns
//! that its unflushed writes are not safe instead of being told they are. Reads go on: they
//! change nothing in storage, and a file system that can still read can be unmounted cleanly and
//! have its data copied off; at worst a block the panic interrupted reads as the client's last
//! or previous write of it.

pub mod cache;
pub mod geometry;
mod streams;

use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

pub use cache::{BlockCache, CacheStats};
pub use geometry::{Geometry, Piece, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

use crate::storage::{Capabilities, MeteredStorage, Storage};
use crate::{background, lock, Error, Result};
use geometry::GrowingGeometry;
use streams::Streams;

/// How a `Volume` caches and writes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeConfig {
    /// Bytes of clean blocks kept in memory.
    pub cache_bytes: u64,
    /// Bytes of dirty blocks allowed before writers start writing back the oldest.
    pub max_dirty_bytes: u64,
    /// Blocks written back or read at once.
    pub concurrency: usize,
    /// When set, a block dirty for this long is written back in the background, so a crash
    /// loses at most about this much of the unflushed writes.
    pub writeback_delay: Option<Duration>,
}

/// One export's device.
#[derive(Debug)]
pub struct Volume {
    /// Grows (never shrinks) while connections use it, when `nbds3ctl resize` grew the export:
    /// every request checks its range against the size of the moment, and a connection never
    /// asks past the size it was given when it opened.
    geometry: GrowingGeometry,
    /// Held while the device grows, so that two growths never list the same new blocks.
    growing: Mutex<()>,
    config: VolumeConfig,
    cache: BlockCache,
    /// The storage under the cache, counting its requests.
    storage: Arc<MeteredStorage>,
    /// Wakes the background writer when dirty blocks pass `max_dirty_bytes`.
    wake: (Mutex<bool>, Condvar),
    /// Sequential reads and writes, and the workers that load ahead and write behind them.
    streams: Streams,
    /// What the storage is like, asked once: whether reading ahead and writing behind pay.
    capabilities: Capabilities,
    /// Which background thread panicked, once one has: writes and FLUSH fail from then on.
    failed: OnceLock<String>,
}

impl Volume {
    /// A device of `geometry` over `storage`, whose stored blocks are listed once, now.
    ///
    /// # Errors
    /// [`Error::Config`] if the storage's block size is not the geometry's; the storage's error
    /// if its blocks cannot be listed.
    pub fn new(storage: Arc<dyn Storage>, geometry: Geometry, config: VolumeConfig) -> Result<Self> {
        let block_size = geometry.block_size();
        if storage.block_size() != block_size {
            return Err(Error::config(
                "block-size",
                format!("{storage} has {}-byte blocks, the volume {block_size}", storage.block_size()),
            ));
        }
        let blocks = |bytes: u64| usize::try_from(bytes / block_size as u64).unwrap_or(usize::MAX);
        let storage = Arc::new(MeteredStorage::new(storage));
        Ok(Volume {
            geometry: GrowingGeometry::new(geometry),
            growing: Mutex::new(()),
            config,
            cache: BlockCache::new(storage.clone(), blocks(config.cache_bytes), geometry.blocks(), config.concurrency)?,
            capabilities: storage.capabilities(),
            storage,
            wake: (Mutex::new(false), Condvar::new()),
            streams: Streams::default(),
            failed: OnceLock::new(),
        })
    }

    /// Starts the background writer of this volume: it writes back the oldest dirty blocks once
    /// more than `max-dirty` is dirty, and, with a `writeback_delay`, every block that has been
    /// dirty that long. It stops when the volume is dropped. Call it after nbdkit forks.
    ///
    /// Below `max-dirty` nothing is written back early (but what sequential writers leave behind,
    /// see `streams`): a working set of random writes that fits costs one PUT per block at
    /// FLUSH, however often it is rewritten.
    pub fn start_background_writer(self: &Arc<Self>) {
        let volume: Weak<Volume> = Arc::downgrade(self);
        let tick =
            self.config.writeback_delay.map_or(Duration::from_secs(1), |d| (d / 2).max(Duration::from_millis(10)));
        let failing = volume.clone();
        let writer = move || {
            // Dirty blocks seen at the previous tick: still dirty now means dirty for a whole tick.
            let mut seen = Vec::new();
            let mut last_error: Option<Instant> = None;
            loop {
                let Some(v) = volume.upgrade() else { return };
                if v.has_failed() {
                    return;
                }
                let woken = {
                    let (flag, condvar) = &v.wake;
                    let guard = lock(flag);
                    let (mut guard, _) =
                        condvar.wait_timeout_while(guard, tick, |woken| !*woken).unwrap_or_else(|e| e.into_inner());
                    std::mem::take(&mut *guard)
                };
                let mut result = Ok(());
                if woken || v.cache.dirty_bytes() > v.config.max_dirty_bytes {
                    result = v.cache.write_back_oldest(v.background_target(), v.config.concurrency);
                }
                if v.config.writeback_delay.is_some() {
                    result = result.and(v.cache.write_back(&seen, v.config.concurrency));
                    seen = v.cache.dirty_ids();
                }
                if let Err(e) = result {
                    // Data stays dirty and is retried; say so at most once a minute.
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        log::warn!("background write-back failed, will retry: {e}");
                        last_error = Some(Instant::now());
                    }
                }
            }
        };
        let spawned = background::spawn("nbds3-writeback", writer, move |what| Self::fail(&failing, what));
        if let Err(e) = spawned {
            log::warn!("cannot start the background writer, writers will write back themselves: {e}");
        }
    }

    /// Fails `volume` (if it is still there) for good, because `what` happened to one of its
    /// background threads; says so once, at error level.
    pub(crate) fn fail(volume: &Weak<Volume>, what: String) {
        let Some(v) = volume.upgrade() else { return };
        // The first death is the one to report; later ones (the other stream workers, dying of
        // the same cause) add nothing a user can act on.
        match v.failed.set(what) {
            Ok(()) => log::error!(
                "{}: {}; writes and FLUSH fail with EIO until nbdkit restarts (reads go on)",
                v.storage,
                v.failed.get().map_or("", String::as_str)
            ),
            Err(what) => log::debug!("{}: {what} as well", v.storage),
        }
    }

    /// Whether writes may go on: no background thread has died.
    ///
    /// # Errors
    /// [`Error::Backend`] naming the thread that died and why.
    fn check_alive(&self) -> Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(what) => {
                Err(Error::backend(&*self.storage, format!("{what}; writes and FLUSH fail until nbdkit restarts")))
            }
        }
    }

    /// Whether a background thread of this volume has died.
    fn has_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// This volume's counters by name, in the stats file's order: the dirty, cached and stored
    /// bytes, the cache's counters, and the requests that reached storage.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let bs = self.geometry().block_size() as u64;
        let memory = [
            ("dirty_bytes", self.cache.dirty_bytes()),
            ("cached_bytes", self.cache.clean_blocks() as u64 * bs),
            ("stored_bytes", self.cache.allocated_blocks() as u64 * bs),
        ];
        memory.into_iter().chain(self.cache.stats.counters()).chain(self.storage.counters()).collect()
    }

    /// The device's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry.get()
    }

    /// Grows the device to `size` bytes, after `nbds3ctl resize` grew its record. The blocks
    /// storage holds in the new range are listed first (normally none), so that they read as
    /// stored from the moment the new size shows. Connections opened before keep the size they
    /// were given (NBD fixes it at the handshake); those opened afterwards see the new one.
    ///
    /// # Errors
    /// [`Error::Config`] naming `size` when it is smaller than the device (a volume never shrinks
    /// under its connections) or not a multiple of the block size; the storage's error if the
    /// new range cannot be listed.
    pub fn grow(&self, size: u64) -> Result<()> {
        let _growing = lock(&self.growing);
        let old = self.geometry();
        if size < old.size() {
            return Err(Error::config(
                "size",
                format!("{size} is less than the device's {} bytes: a volume does not shrink while open", old.size()),
            ));
        }
        let new = old.with_size(size)?;
        self.cache.add_stored(old.blocks()..new.blocks(), self.config.concurrency)?;
        self.geometry.grow(new);
        Ok(())
    }

    /// The cache, for its counters.
    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    /// Reads `buf.len()` bytes at `offset`, and reads ahead when reads are sequential.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_sequentially(self: &Arc<Self>, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read(buf, offset)?;
        self.streams.after_read(self, offset, buf.len() as u64);
        Ok(())
    }

    /// Writes `data` at `offset`, and writes back behind writes that are sequential.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn write_sequentially(self: &Arc<Self>, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.write(data, offset, fua)?;
        self.streams.after_write(self, offset, data.len() as u64);
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`], or the storage's error for a block that could not be read.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let pieces: Vec<Piece> = self.geometry().pieces(offset, buf.len() as u64)?.collect();
        // Fetch the missing blocks of a chunk at once rather than one round trip after another;
        // a chunk is at most half the cache, so nothing fetched is evicted before it is copied.
        let chunk = (self.cache.capacity() / 2).max(1);
        for chunk in pieces.chunks(chunk) {
            if chunk.len() > 1 {
                self.cache.prefetch(chunk.iter().map(|p| p.block), self.config.concurrency)?;
            }
            for p in chunk {
                let out = &mut buf[p.buf_offset..p.buf_offset + p.len];
                self.cache.read(p.block, p.offset_in_block, out)?;
            }
        }
        Ok(())
    }

    /// Loads the stored blocks of `len` bytes at `offset` into the cache (NBD_CMD_CACHE, and
    /// read-ahead), as many as the cache holds, without returning them.
    ///
    /// # Errors
    /// [`Error::OutOfRange`], or the storage's error for a block that could not be read.
    pub fn prefetch(&self, len: u64, offset: u64) -> Result<()> {
        let pieces = self.geometry().pieces(offset, len)?;
        let blocks = pieces.map(|p| p.block).take(self.cache.capacity());
        self.cache.prefetch(blocks, self.config.concurrency)
    }

    /// Writes `data` at `offset`; with `fua`, it is durable in storage before this returns.
    ///
    /// # Errors
    /// [`Error::OutOfRange`], or a storage error from reading a partial block, from making room
    /// among the dirty blocks, or (with `fua`) from writing back. [`Error::Backend`] naming the
    /// thread once a background thread of the volume died.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check_alive()?;
        let pieces = self.geometry().pieces(offset, data.len() as u64)?;
        self.make_room()?;
        for p in pieces {
            self.cache.write(p.block, p.offset_in_block, &data[p.buf_offset..p.buf_offset + p.len])?;
        }
        self.finish(offset, data.len() as u64, fua)
    }

    /// Makes `len` bytes at `offset` read as zeros. Whole blocks are dropped from storage without
    /// being read, at a cost proportional to the blocks stored there, not to the range; partial
    /// blocks at the edges are zeroed by read-modify-write.
    ///
    /// # Errors
    /// [`Error::FastZeroUnsupported`] when `fast` is set and the range has partial blocks (that
    /// would need a read); otherwise as [`write`](Self::write).
    pub fn zero(&self, len: u64, offset: u64, fua: bool, fast: bool) -> Result<()> {
        self.check_alive()?;
        let geometry = self.geometry();
        let block_size = geometry.block_size();
        let edges = geometry.partial_pieces(offset, len)?;
        let whole = geometry.whole_blocks(offset, len);
        if fast && !edges.is_empty() {
            return Err(Error::FastZeroUnsupported);
        }
        self.make_room()?;
        let zeros = vec![0u8; block_size];
        for p in &edges {
            self.cache.write(p.block, p.offset_in_block, &zeros[..p.len])?;
        }
        self.cache.zero_blocks(whole)?;
        self.finish(offset, len, fua)
    }

    /// The allocation status of `len` bytes at `offset`: `(offset, length, holds data)` runs in
    /// order, covering the range. Holes read as zeros and cost nothing in storage.
    ///
    /// # Errors
    /// [`Error::OutOfRange`].
    pub fn extents(&self, len: u64, offset: u64) -> Result<Vec<(u64, u64, bool)>> {
        let geometry = self.geometry();
        geometry.pieces(offset, len)?;
        let bs = geometry.block_size() as u64;
        let end = offset + len;
        let blocks = offset / bs..end.div_ceil(bs);
        Ok(self
            .cache
            .extents(blocks)
            .into_iter()
            .map(|(r, data)| {
                let start = (r.start * bs).max(offset);
                (start, (r.end * bs).min(end) - start, data)
            })
            .collect())
    }

    /// Writes back every dirty block, then flushes storage: every write acknowledged before this
    /// call is durable when it returns `Ok`.
    ///
    /// # Errors
    /// The first storage error; blocks that failed stay dirty and a later flush retries them.
    /// [`Error::Backend`] naming the thread once a background thread of the volume died.
    pub fn flush(&self) -> Result<()> {
        self.check_alive()?;
        self.cache.write_back_all(self.config.concurrency)?;
        self.storage.flush()
    }

    /// With `fua`, makes the blocks of `len` bytes at `offset` durable: all dirty blocks where a
    /// flush commits all the storage holds (see [`Capabilities::atomic_flush`]).
    fn finish(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        if !fua {
            return Ok(());
        }
        if self.capabilities.atomic_flush {
            return self.flush();
        }
        let bs = self.geometry().block_size() as u64;
        self.cache.write_back_range(offset / bs..(offset + len).div_ceil(bs), self.config.concurrency)?;
        self.storage.flush()
    }

    /// Past `max-dirty`, wakes the background writer and writes back the oldest blocks until
    /// there is room: a writer waits only when write-back cannot keep up.
    fn make_room(&self) -> Result<()> {
        let max = self.config.max_dirty_bytes;
        // At the limit but not past it: writes to blocks already dirty add nothing, so let them in.
        if self.cache.dirty_bytes() <= max {
            return Ok(());
        }
        {
            let (flag, condvar) = &self.wake;
            *lock(flag) = true;
            condvar.notify_one();
        }
        self.cache.write_back_oldest(max, self.config.concurrency)
    }

    /// Where the background writer stops: a round of requests (`concurrency` blocks, at most a
    /// quarter of `max-dirty`) below `max-dirty`, so that writers find room for a while.
    fn background_target(&self) -> u64 {
        let round = self.config.concurrency as u64 * self.geometry().block_size() as u64;
        let max = self.config.max_dirty_bytes;
        max - round.min(max / 4)
    }
}

#[cfg(test)]
mod tests;

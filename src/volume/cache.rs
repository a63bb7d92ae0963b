//! `BlockCache`: the per-block state of one export (LRU clean blocks, dirty blocks, per-block locks)
//! over its [`Storage`].
//!
//! Every block that is in use or cached has a [`Slot`]. A slot's `state` mutex is the per-block
//! lock: a read-modify-write holds it from the read to the modify, so concurrent partial writes
//! to one block never lose an update, and a miss holds it while it loads, so concurrent misses on
//! one block share one storage read.
//!
//! | content    | stored_gen == gen (clean)              | stored_gen < gen (dirty)               |
//! |------------|----------------------------------------|----------------------------------------|
//! | `Unloaded` | placeholder, not read yet              | never                                  |
//! | `Zero`     | known absent in storage                | to be deleted from storage             |
//! | `Data`     | same bytes as storage                  | to be written to storage               |
//!
//! Clean slots live in the `clean` LRU, bounded by `capacity`; dirty slots live in `dirty`, in the
//! order they became dirty, and are never evicted. A write-back holds the slot's `io` mutex from
//! the snapshot of its content until storage acknowledged it, so two write-backs of one block can
//! never land out of order; writers keep writing meanwhile (the snapshot is a shared `Arc`, and a
//! writer copies on write).
//!
//! Lock order: a thread may take the `index` lock while it holds a slot's `state`, but while it
//! holds `index` it only ever `try_lock`s a `state` (to evict), so the two orders cannot deadlock.
//! An evicted slot is marked `evicted`; a thread that locks a slot and finds that mark looks the
//! block up again.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::storage::{is_zero, BlockId, Storage};
use crate::{lock, Error, Result};

/// What a slot knows of its block's bytes.
#[derive(Debug, Clone)]
enum Content {
    Unloaded,
    Zero,
    Data(Arc<Vec<u8>>),
}

#[derive(Debug)]
struct SlotState {
    content: Content,
    /// Bumped by every change of `content` by a writer.
    gen: u64,
    /// The `gen` that storage holds; only a write-back (holding `io`) raises it.
    stored_gen: u64,
    /// Set by eviction: this slot is no longer in the index and must not be used.
    evicted: bool,
}

impl SlotState {
    fn is_dirty(&self) -> bool {
        self.gen != self.stored_gen
    }
}

#[derive(Debug)]
struct Slot {
    /// Held by a write-back from snapshot to acknowledgement.
    io: Mutex<()>,
    /// The per-block lock.
    state: Mutex<SlotState>,
}

#[derive(Debug)]
struct Index {
    /// Clean slots, least recently used first.
    clean: LruCache<BlockId, Arc<Slot>>,
    /// Dirty slots, oldest first (used as a FIFO: never promoted).
    dirty: LruCache<BlockId, Arc<Slot>>,
}

/// Counters of one cache, read by tests and logged at unload.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads and writes served without reading storage.
    pub hits: AtomicU64,
    /// Blocks read from storage.
    pub misses: AtomicU64,
    /// Partial writes that had to read their block first.
    pub read_modify_writes: AtomicU64,
    /// Blocks written to storage (PUT).
    pub blocks_written: AtomicU64,
    /// Blocks deleted from storage because they became all zeros.
    pub blocks_deleted: AtomicU64,
}

/// The clean and dirty blocks of one export over its storage.
#[derive(Debug)]
pub struct BlockCache {
    storage: Arc<dyn Storage>,
    block_size: usize,
    /// How many clean blocks are kept.
    capacity: usize,
    index: Mutex<Index>,
    /// Counters.
    pub stats: CacheStats,
}

impl BlockCache {
    /// A cache of at most `capacity` clean blocks over `storage`.
    pub fn new(storage: Arc<dyn Storage>, capacity: usize) -> Self {
        BlockCache {
            block_size: storage.block_size(),
            storage,
            capacity,
            index: Mutex::new(Index {
                clean: LruCache::unbounded(),
                dirty: LruCache::unbounded(),
            }),
            stats: CacheStats::default(),
        }
    }

    /// The storage under this cache.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// How many blocks are dirty.
    pub fn dirty_blocks(&self) -> usize {
        lock(&self.index).dirty.len()
    }

    /// How many clean blocks are cached.
    pub fn clean_blocks(&self) -> usize {
        lock(&self.index).clean.len()
    }

    /// Copies `out.len()` bytes of block `id`, from `offset` in the block, into `out`.
    pub fn read(&self, id: BlockId, offset: usize, out: &mut [u8]) -> Result<()> {
        self.with_slot(id, |st| {
            self.load(id, st)?;
            match &st.content {
                Content::Data(d) => out.copy_from_slice(&d[self.range(id, offset, out.len())?]),
                _ => out.fill(0),
            }
            Ok(())
        })
    }

    /// Writes `data` into block `id` at `offset`, reading the block first only if the write
    /// covers part of it.
    pub fn write(&self, id: BlockId, offset: usize, data: &[u8]) -> Result<()> {
        let whole = offset == 0 && data.len() == self.block_size;
        self.with_slot(id, |st| {
            if whole {
                st.content = if is_zero(data) {
                    Content::Zero
                } else {
                    Content::Data(Arc::new(data.to_vec()))
                };
            } else {
                if matches!(st.content, Content::Unloaded) {
                    self.stats.read_modify_writes.fetch_add(1, Relaxed);
                }
                self.load(id, st)?;
                if matches!(st.content, Content::Zero) {
                    if is_zero(data) {
                        return Ok(());
                    }
                    st.content = Content::Data(Arc::new(vec![0; self.block_size]));
                }
                let range = self.range(id, offset, data.len())?;
                if let Content::Data(d) = &mut st.content {
                    Arc::make_mut(d)[range].copy_from_slice(data);
                }
            }
            st.gen += 1;
            Ok(())
        })
    }

    /// Makes block `id` all zeros without reading it; storage loses it at the next write-back.
    pub fn zero(&self, id: BlockId) -> Result<()> {
        self.with_slot(id, |st| {
            if !matches!(st.content, Content::Zero) {
                st.content = Content::Zero;
                st.gen += 1;
            }
            Ok(())
        })
    }

    /// Writes back the dirty blocks among `ids`, up to `concurrency` at a time.
    ///
    /// # Errors
    /// The first storage error; blocks that failed stay dirty, so a later flush retries them.
    pub fn write_back(&self, ids: &[BlockId], concurrency: usize) -> Result<()> {
        let slots: Vec<(BlockId, Arc<Slot>)> = {
            let index = lock(&self.index);
            ids.iter()
                .filter_map(|id| index.dirty.peek(id).map(|s| (*id, s.clone())))
                .collect()
        };
        self.write_back_slots(slots, concurrency)
    }

    /// Writes back every dirty block, up to `concurrency` at a time.
    ///
    /// # Errors
    /// As [`write_back`](Self::write_back).
    pub fn write_back_all(&self, concurrency: usize) -> Result<()> {
        let slots: Vec<_> = lock(&self.index)
            .dirty
            .iter()
            .map(|(id, s)| (*id, s.clone()))
            .collect();
        self.write_back_slots(slots, concurrency)
    }

    /// Writes back the oldest dirty blocks until at most `limit` remain dirty.
    ///
    /// # Errors
    /// As [`write_back`](Self::write_back).
    pub fn write_back_oldest(&self, limit: usize, concurrency: usize) -> Result<()> {
        loop {
            let slots: Vec<_> = {
                let index = lock(&self.index);
                let excess = index.dirty.len().saturating_sub(limit);
                if excess == 0 {
                    return Ok(());
                }
                // `iter().rev()` walks from the least recently inserted, i.e. the oldest dirty block.
                index
                    .dirty
                    .iter()
                    .rev()
                    .take(excess.min(concurrency * 4))
                    .map(|(id, s)| (*id, s.clone()))
                    .collect()
            };
            self.write_back_slots(slots, concurrency)?;
        }
    }

    fn write_back_slots(&self, slots: Vec<(BlockId, Arc<Slot>)>, concurrency: usize) -> Result<()> {
        let workers = concurrency.clamp(1, slots.len().max(1));
        if workers == 1 {
            return slots
                .iter()
                .try_for_each(|(id, slot)| self.write_back_slot(*id, slot));
        }
        let queue = Mutex::new(slots.into_iter());
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let Some((id, slot)) = lock(&queue).next() else {
                        break;
                    };
                    if let Err(e) = self.write_back_slot(id, &slot) {
                        lock(&first_error).get_or_insert(e);
                    }
                });
            }
        });
        let first_error = lock(&first_error).take();
        first_error.map_or(Ok(()), Err)
    }

    fn write_back_slot(&self, id: BlockId, slot: &Arc<Slot>) -> Result<()> {
        let _io = lock(&slot.io);
        let (content, gen) = {
            let st = lock(&slot.state);
            if !st.is_dirty() {
                return Ok(());
            }
            (st.content.clone(), st.gen)
        };
        match &content {
            Content::Data(d) if !is_zero(d) => {
                self.storage.write_block(id, d)?;
                self.stats.blocks_written.fetch_add(1, Relaxed);
            }
            Content::Data(_) | Content::Zero => {
                self.storage.delete_block(id)?;
                self.stats.blocks_deleted.fetch_add(1, Relaxed);
            }
            Content::Unloaded => {
                return Err(Error::backend(
                    &self.storage,
                    format!("block {id} is dirty but was never loaded"),
                ))
            }
        }
        drop(content);
        let mut st = lock(&slot.state);
        st.stored_gen = gen;
        if !st.is_dirty() {
            let mut index = lock(&self.index);
            if let Some(slot) = index.dirty.pop(&id) {
                index.clean.push(id, slot);
                self.evict_excess(&mut index);
            }
        }
        Ok(())
    }

    /// Runs `f` on block `id`'s locked state, keeping the index in step with its dirtiness.
    fn with_slot<R>(&self, id: BlockId, f: impl FnOnce(&mut SlotState) -> Result<R>) -> Result<R> {
        loop {
            let slot = self.slot(id);
            let mut st = lock(&slot.state);
            if st.evicted {
                continue;
            }
            let was_dirty = st.is_dirty();
            let result = f(&mut st);
            if st.is_dirty() && !was_dirty {
                let mut index = lock(&self.index);
                if let Some(slot) = index.clean.pop(&id) {
                    index.dirty.push(id, slot);
                }
            }
            return result;
        }
    }

    /// The slot of block `id`, created (and the LRU trimmed) if it has none.
    fn slot(&self, id: BlockId) -> Arc<Slot> {
        let mut index = lock(&self.index);
        if let Some(slot) = index.dirty.peek(&id) {
            return slot.clone();
        }
        if let Some(slot) = index.clean.get(&id) {
            return slot.clone();
        }
        let slot = Arc::new(Slot {
            io: Mutex::new(()),
            state: Mutex::new(SlotState {
                content: Content::Unloaded,
                gen: 0,
                stored_gen: 0,
                evicted: false,
            }),
        });
        index.clean.push(id, slot.clone());
        self.evict_excess(&mut index);
        slot
    }

    /// Drops least recently used clean slots beyond `capacity`, skipping slots in use and never
    /// touching the most recently used one (the caller's).
    fn evict_excess(&self, index: &mut Index) {
        let mut budget = index.clean.len().saturating_sub(1);
        while index.clean.len() > self.capacity && budget > 0 {
            budget -= 1;
            let Some((id, slot)) = index.clean.pop_lru() else {
                break;
            };
            let evicted = match slot.state.try_lock() {
                Ok(mut st) if !st.is_dirty() => {
                    st.evicted = true;
                    true
                }
                _ => false,
            };
            if !evicted {
                index.clean.push(id, slot);
            }
        }
    }

    /// Reads block `id` from storage into a slot that has not been read yet.
    fn load(&self, id: BlockId, st: &mut SlotState) -> Result<()> {
        if !matches!(st.content, Content::Unloaded) {
            self.stats.hits.fetch_add(1, Relaxed);
            return Ok(());
        }
        self.stats.misses.fetch_add(1, Relaxed);
        let mut buf = vec![0; self.block_size];
        st.content = if self.storage.read_block(id, &mut buf)? && !is_zero(&buf) {
            Content::Data(Arc::new(buf))
        } else {
            Content::Zero
        };
        Ok(())
    }

    /// The bytes `offset..offset + len` of a block, checked so that indexing with them cannot panic.
    fn range(&self, id: BlockId, offset: usize, len: usize) -> Result<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.block_size => Ok(offset..end),
            _ => Err(Error::backend(
                &self.storage,
                format!("{len} bytes at {offset} do not fit in block {id}"),
            )),
        }
    }
}

impl std::fmt::Display for CacheStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cache hits {} misses {} read-modify-writes {} blocks written {} deleted {}",
            self.hits.load(Relaxed),
            self.misses.load(Relaxed),
            self.read_modify_writes.load(Relaxed),
            self.blocks_written.load(Relaxed),
            self.blocks_deleted.load(Relaxed)
        )
    }
}

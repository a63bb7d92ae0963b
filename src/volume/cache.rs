//! `BlockCache`: the per-block state of one export (LRU clean blocks, dirty blocks, per-block
//! locks, and the map of which blocks storage holds) over its [`Storage`].
//!
//! Every block that is in use, cached or dirty has a [`Slot`]. A slot's `state` mutex is the
//! per-block lock: a read-modify-write holds it from the read to the modify, so concurrent partial
//! writes to one block never lose an update, and a miss holds it while it loads, so concurrent
//! misses on one block share one storage read.
//!
//! | content    | stored_gen == gen (clean)              | stored_gen < gen (dirty)               |
//! |------------|----------------------------------------|----------------------------------------|
//! | `Unloaded` | placeholder, not read yet              | never                                  |
//! | `Zero`     | only while in use, then dropped        | to be deleted from storage             |
//! | `Data`     | same bytes as storage; may be in the   | to be written to storage; may be in    |
//! |            | hit table                              | the hit table                          |
//! | `Partial`  | never                                  | some bytes written over an unread      |
//! |            |                                        | stored block; the rest comes from a    |
//! |            |                                        | read when the block is read or stored  |
//!
//! The index holds, under one mutex: clean slots in an LRU bounded by `capacity`; dirty slots in
//! the order they became dirty (never evicted); and `allocated`, the blocks storage holds, listed
//! once when the export opens and updated by every write-back. A block with no slot that is not
//! `allocated` reads as zeros without a storage request, and zeroing it costs nothing.
//!
//! Blocks a long sequential read has left behind are moved to the cold end of the clean LRU
//! ([`demote`](BlockCache::demote), called by the read-ahead detector), the last one left
//! coldest: once the cache is full, such a scan evicts the block it read last, and its buffer
//! goes through `BlockBuf`'s pool to the next block it loads, while the blocks that were cached
//! before it stay. A read through the index moves a block back to the front, so a demoted block
//! that is read again is an ordinary one.
//!
//! The hit table ([`hits`]) lets a read of a `Data` block skip the index: an entry holds a
//! block's buffer, shared with its slot, and the address of its bytes (so a hit reads no
//! buffer header). A read that finds `Data` through the index publishes it
//! there; a writer (any `with_slot` that may create) takes the block out, holding its `state`,
//! before it changes the content; eviction takes it out with the slot. So an entry always holds
//! the current bytes of a resident block, and no memory beyond the cache's. Hits through the
//! table do not move the block in the LRU; one read in [`PROMOTE_EVERY`] per thread goes through
//! the index and does, so a block read often is still kept.
//!
//! A write-back holds the slot's `io` mutex from the snapshot of its content until storage
//! acknowledged it, so two write-backs of one block never land out of order; writers keep writing
//! meanwhile (the snapshot is a shared `Arc`, and a writer copies on write). A batch of deletes
//! takes the `io` mutexes of its blocks in ascending block order, so batches cannot deadlock.
//!
//! Lock order: a thread may take the `index` lock while it holds a slot's `state`, but while it
//! holds `index` it only ever `try_lock`s a `state` (to evict), so the two orders cannot deadlock.
//! An evicted slot is marked `evicted`; a thread that locks a slot and finds that mark looks the
//! block up again.

mod hits;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::block_buf::BlockBuf;
use crate::parallel::{parallel, parallel_while};
use crate::storage::{is_zero, BlockId, Storage};
use crate::{lock, Error, Result};
use hits::HitTable;

/// Whole-block zeroes larger than this many stored blocks are deleted from storage while the
/// request runs, in batches of this size, so a full-device trim needs no memory per block.
const DELETE_BATCH: usize = 1000;

/// One read in this many (per thread) of a block in the hit table goes through the index
/// instead, which moves the block to the front of the LRU: a block read often is promoted long
/// before it reaches the end, without every hit serialising on the index.
const PROMOTE_EVERY: u32 = 32;

thread_local! {
    /// Reads this thread served from the hit table since it last went through the index.
    static TABLE_HITS: Cell<u32> = const { Cell::new(0) };
}

/// Whether this read may use the hit table (false once every [`PROMOTE_EVERY`] reads).
fn may_skip_index() -> bool {
    TABLE_HITS.with(|n| {
        let next = (n.get() + 1) % PROMOTE_EVERY;
        n.set(next);
        next != 0
    })
}

/// The blocks storage holds among `blocks`, listed in slices, up to `concurrency` at a time,
/// where the store lists faster so.
fn list_stored(storage: &dyn Storage, blocks: Range<u64>, concurrency: usize) -> Result<BTreeSet<u64>> {
    let allocated = Mutex::new(BTreeSet::new());
    // Eight slices keep a busy S3 server listing a large export eight pages at a time.
    let slices: u64 = if storage.capabilities().sliced_listing { 8 } else { 1 };
    let step = (blocks.end - blocks.start).div_ceil(slices).max(1);
    let ranges: Vec<Range<u64>> = (0..slices)
        .map(|i| blocks.start + i * step..(blocks.start + (i + 1) * step).min(blocks.end))
        .filter(|r| !r.is_empty())
        .collect();
    parallel(ranges, concurrency, |r| {
        let ids = storage.list_blocks_in(r)?;
        lock(&allocated).extend(ids.into_iter().map(|b| b.0));
        Ok(())
    })?;
    Ok(allocated.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// What a slot knows of its block's bytes.
#[derive(Debug, Clone)]
enum Content {
    Unloaded,
    Zero,
    Data(Arc<BlockBuf>),
    /// Written in part over a stored block that was never read, so the write needed no read:
    /// `valid` are the bytes written (sorted, disjoint, not touching); the rest of `data` is
    /// filled from storage when the block is read there or written back.
    Partial {
        data: Vec<u8>,
        valid: Vec<Range<usize>>,
    },
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

type SlotRef = (BlockId, Arc<Slot>);

#[derive(Debug)]
struct Index {
    /// Clean slots, least recently used first.
    clean: LruCache<BlockId, Arc<Slot>>,
    /// Dirty slots, oldest first (used as a FIFO: never promoted).
    dirty: LruCache<BlockId, Arc<Slot>>,
    /// The blocks storage holds.
    allocated: BTreeSet<u64>,
}

impl Index {
    fn slot(&self, id: &BlockId) -> Option<&Arc<Slot>> {
        self.dirty.peek(id).or_else(|| self.clean.peek(id))
    }
}

/// Counters of one cache, read by tests and logged at unload.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Block reads served from memory.
    pub hits: AtomicU64,
    /// Block reads of blocks storage does not hold, answered without a request.
    pub holes: AtomicU64,
    /// Blocks read from storage (GET).
    pub misses: AtomicU64,
    /// Partially written blocks that had to be completed with a read from storage.
    pub read_modify_writes: AtomicU64,
}

impl CacheStats {
    /// The counters by name, in the stats file's order.
    pub fn counters(&self) -> [(&'static str, u64); 4] {
        [
            ("hits", self.hits.load(Relaxed)),
            ("holes", self.holes.load(Relaxed)),
            ("misses", self.misses.load(Relaxed)),
            ("read_modify_writes", self.read_modify_writes.load(Relaxed)),
        ]
    }
}

/// The clean and dirty blocks of one export over its storage.
#[derive(Debug)]
pub struct BlockCache {
    storage: Arc<dyn Storage>,
    block_size: usize,
    /// How many clean blocks are kept.
    capacity: usize,
    index: Mutex<Index>,
    /// Resident blocks a read may copy without the index.
    hits: HitTable,
    /// Memory held by dirty blocks: a whole block for `Data`, the pages written for `Partial`,
    /// nothing for `Zero`. Changed only by a thread holding the block's `state` lock.
    dirty_bytes: AtomicU64,
    /// Counters.
    pub stats: CacheStats,
}

impl BlockCache {
    /// A cache of at most `capacity` clean blocks over `storage`, listing the stored blocks of
    /// the device's `blocks` once, in up to `concurrency` slices at a time.
    ///
    /// # Errors
    /// The storage's error if the blocks cannot be listed.
    pub fn new(storage: Arc<dyn Storage>, capacity: usize, blocks: u64, concurrency: usize) -> Result<Self> {
        let allocated = list_stored(&*storage, 0..blocks, concurrency)?;
        let block_size = storage.block_size();
        Ok(BlockCache {
            block_size,
            storage,
            capacity,
            hits: HitTable::new(capacity, block_size),
            index: Mutex::new(Index { clean: LruCache::unbounded(), dirty: LruCache::unbounded(), allocated }),
            dirty_bytes: AtomicU64::new(0),
            stats: CacheStats::default(),
        })
    }

    /// Adds the blocks storage holds among `blocks` to the map of stored blocks: a range the
    /// device grew into, which no request may touch yet.
    ///
    /// # Errors
    /// The storage's error if the blocks cannot be listed.
    pub fn add_stored(&self, blocks: Range<u64>, concurrency: usize) -> Result<()> {
        let stored = list_stored(&*self.storage, blocks, concurrency)?;
        lock(&self.index).allocated.extend(stored);
        Ok(())
    }

    /// How many clean blocks the cache keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Memory held by dirty blocks, in bytes.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Relaxed)
    }

    /// How many blocks are dirty.
    pub fn dirty_blocks(&self) -> usize {
        lock(&self.index).dirty.len()
    }

    /// The dirty blocks, oldest first.
    pub fn dirty_ids(&self) -> Vec<BlockId> {
        lock(&self.index).dirty.iter().rev().map(|(id, _)| *id).collect()
    }

    /// How many clean blocks are cached.
    pub fn clean_blocks(&self) -> usize {
        lock(&self.index).clean.len()
    }

    /// How many blocks storage holds.
    pub fn allocated_blocks(&self) -> usize {
        lock(&self.index).allocated.len()
    }

    /// Copies `out.len()` bytes of block `id`, from `offset` in the block, into `out`.
    pub fn read(&self, id: BlockId, offset: usize, out: &mut [u8]) -> Result<()> {
        let range = self.range(id, offset, out.len())?;
        if may_skip_index() && self.hits.copy(id, range.clone(), out) {
            self.stats.hits.fetch_add(1, Relaxed);
            return Ok(());
        }
        self.with_slot(id, false, |st| {
            if let Content::Partial { data, valid } = &st.content {
                if valid.iter().any(|v| v.start <= range.start && range.end <= v.end) {
                    self.stats.hits.fetch_add(1, Relaxed);
                    out.copy_from_slice(&data[range]);
                    return Ok(());
                }
            }
            self.load(id, st)?;
            match &st.content {
                Content::Data(d) => {
                    out.copy_from_slice(&d[range]);
                    self.hits.publish(id, d);
                }
                _ => out.fill(0),
            }
            Ok(())
        })
        .map(|done| {
            if done.is_none() {
                self.stats.holes.fetch_add(1, Relaxed);
                out.fill(0);
            }
        })
    }

    /// Moves the clean blocks among `blocks` to the cold end of the LRU, in ascending order (so
    /// the last is evicted first): blocks a sequential scan has read and moved past, which would
    /// otherwise push out the blocks cached before it.
    pub fn demote(&self, blocks: Range<u64>) {
        let mut index = lock(&self.index);
        for b in blocks {
            index.clean.demote(&BlockId(b));
        }
    }

    /// Loads the stored blocks among `ids` that are not in memory, up to `concurrency` at a time,
    /// so a request spanning many blocks waits for one round trip instead of one per block.
    ///
    /// # Errors
    /// The first storage error.
    pub fn prefetch(&self, ids: impl Iterator<Item = BlockId>, concurrency: usize) -> Result<()> {
        let missing: Vec<BlockId> = {
            let index = lock(&self.index);
            ids.filter(|id| index.allocated.contains(&id.0) && index.slot(id).is_none()).collect()
        };
        parallel(missing, concurrency, |id| self.with_slot(id, false, |st| self.load(id, st)).map(drop))
    }

    /// Writes `data` into block `id` at `offset`. Nothing is read: a partial write over a stored
    /// block that is not in memory keeps just the bytes written until the block is read or
    /// written back.
    pub fn write(&self, id: BlockId, offset: usize, data: &[u8]) -> Result<()> {
        let range = self.range(id, offset, data.len())?;
        let whole = data.len() == self.block_size;
        self.with_slot(id, true, |st| {
            if whole {
                st.content =
                    if is_zero(data) { Content::Zero } else { Content::Data(Arc::new(BlockBuf::copy_of(data))) };
                st.gen += 1;
                return Ok(());
            }
            if matches!(st.content, Content::Unloaded) {
                if lock(&self.index).allocated.contains(&id.0) {
                    st.content = Content::Partial { data: vec![0; self.block_size], valid: Vec::new() };
                } else {
                    self.load(id, st)?;
                }
            }
            match &mut st.content {
                Content::Zero if is_zero(data) => return Ok(()),
                Content::Zero | Content::Unloaded => {
                    let mut block = BlockBuf::zeroed(self.block_size);
                    block[range].copy_from_slice(data);
                    st.content = Content::Data(Arc::new(block));
                }
                Content::Data(d) => Arc::make_mut(d)[range].copy_from_slice(data),
                Content::Partial { data: block, valid } => {
                    block[range.clone()].copy_from_slice(data);
                    add_range(valid, range);
                    if valid.first() == Some(&(0..self.block_size)) {
                        st.content = Content::Data(Arc::new(BlockBuf::copy_of(block)));
                    }
                }
            }
            st.gen += 1;
            Ok(())
        })
        .map(drop)
    }

    /// Makes the whole blocks `blocks` read as zeros without reading them. Only blocks that are
    /// stored or in memory need any work; a large range deletes its stored blocks from storage
    /// before returning, in batches, rather than holding a dirty slot per block.
    ///
    /// # Errors
    /// A storage error from a batch delete; those blocks stay dirty.
    pub fn zero_blocks(&self, blocks: Range<u64>) -> Result<()> {
        let candidates: Vec<BlockId> = {
            let index = lock(&self.index);
            let mut ids: BTreeSet<u64> = index.allocated.range(blocks.clone()).copied().collect();
            let span = blocks.end.saturating_sub(blocks.start);
            if span < (index.clean.len() + index.dirty.len()) as u64 {
                ids.extend(blocks.clone().filter(|b| index.slot(&BlockId(*b)).is_some()));
            } else {
                let cached = index.clean.iter().chain(index.dirty.iter()).map(|(id, _)| id.0);
                ids.extend(cached.filter(|b| blocks.contains(b)));
            }
            ids.into_iter().map(BlockId).collect()
        };
        let large = candidates.len() > DELETE_BATCH;
        for chunk in candidates.chunks(DELETE_BATCH) {
            for &id in chunk {
                self.with_slot(id, true, |st| {
                    if !matches!(st.content, Content::Zero) {
                        st.content = Content::Zero;
                        st.gen += 1;
                    }
                    Ok(())
                })?;
            }
            if large {
                self.write_back(chunk, 1)?;
            }
        }
        Ok(())
    }

    /// The ranges of blocks in `blocks` that may hold data (`true`) or are holes that read as
    /// zeros (`false`), in order and covering `blocks`. Dirty blocks count as data.
    pub fn extents(&self, blocks: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let data: BTreeSet<u64> = {
            let index = lock(&self.index);
            let mut ids: BTreeSet<u64> = index.allocated.range(blocks.clone()).copied().collect();
            ids.extend(index.dirty.iter().map(|(id, _)| id.0).filter(|b| blocks.contains(b)));
            ids
        };
        let mut extents: Vec<(Range<u64>, bool)> = Vec::new();
        let mut at = blocks.start;
        for b in data {
            if b > at {
                extents.push((at..b, false));
            }
            match extents.last_mut() {
                Some((r, true)) if r.end == b => r.end = b + 1,
                _ => extents.push((b..b + 1, true)),
            }
            at = b + 1;
        }
        if at < blocks.end {
            extents.push((at..blocks.end, false));
        }
        extents
    }

    /// Writes back the dirty blocks among `ids`, up to `concurrency` at a time.
    ///
    /// # Errors
    /// The first storage error; blocks that failed stay dirty, so a later flush retries them.
    pub fn write_back(&self, ids: &[BlockId], concurrency: usize) -> Result<()> {
        let slots: Vec<SlotRef> = {
            let index = lock(&self.index);
            ids.iter().filter_map(|id| index.dirty.peek(id).map(|s| (*id, s.clone()))).collect()
        };
        self.write_back_slots(slots, concurrency)
    }

    /// Writes back the dirty blocks in `blocks`, up to `concurrency` at a time.
    ///
    /// # Errors
    /// As [`write_back`](Self::write_back).
    pub fn write_back_range(&self, blocks: Range<u64>, concurrency: usize) -> Result<()> {
        let slots: Vec<SlotRef> = {
            let index = lock(&self.index);
            let dirty = index.dirty.iter().filter(|(id, _)| blocks.contains(&id.0));
            dirty.map(|(id, s)| (*id, s.clone())).collect()
        };
        self.write_back_slots(slots, concurrency)
    }

    /// Writes back every dirty block, up to `concurrency` at a time.
    ///
    /// # Errors
    /// As [`write_back`](Self::write_back).
    pub fn write_back_all(&self, concurrency: usize) -> Result<()> {
        let slots: Vec<SlotRef> = lock(&self.index).dirty.iter().map(|(id, s)| (*id, s.clone())).collect();
        self.write_back_slots(slots, concurrency)
    }

    /// Writes back the oldest dirty blocks until they hold at most `limit` bytes.
    ///
    /// # Errors
    /// As [`write_back`](Self::write_back).
    pub fn write_back_oldest(&self, limit: u64, concurrency: usize) -> Result<()> {
        while self.dirty_bytes() > limit {
            // Oldest first (`iter().rev()` walks from the least recently inserted): enough to
            // bring the dirty bytes down to `limit`, and one more per worker so that all of them
            // stay busy to the end. The workers stop taking blocks once enough are written, so
            // `concurrency` requests stay in flight until then rather than draining batch by
            // batch; the loop takes more if partly written blocks freed less than a block each.
            let excess = self.dirty_bytes().saturating_sub(limit).div_ceil(self.block_size as u64);
            let wanted = usize::try_from(excess).unwrap_or(usize::MAX).saturating_add(concurrency);
            let slots: Vec<SlotRef> =
                lock(&self.index).dirty.iter().rev().take(wanted).map(|(id, s)| (*id, s.clone())).collect();
            if slots.is_empty() {
                return Ok(());
            }
            self.write_back_slots_while(slots, concurrency, &|| self.dirty_bytes() > limit)?;
        }
        Ok(())
    }

    /// What `content` costs in memory while it is dirty.
    fn dirty_cost(&self, content: &Content) -> u64 {
        match content {
            Content::Data(_) => self.block_size as u64,
            // Untouched pages of a large zeroed buffer are never mapped, so only written pages count.
            Content::Partial { valid, .. } => {
                let pages: u64 = valid.iter().map(|v| (v.end.div_ceil(4096) - v.start / 4096) as u64).sum();
                (pages * 4096).min(self.block_size as u64)
            }
            Content::Zero | Content::Unloaded => 0,
        }
    }

    /// Runs `change` on a slot's state, keeping `dirty_bytes` in step with it.
    fn accounted<R>(&self, st: &mut SlotState, change: impl FnOnce(&mut SlotState) -> R) -> R {
        let before = if st.is_dirty() { self.dirty_cost(&st.content) } else { 0 };
        let result = change(st);
        let after = if st.is_dirty() { self.dirty_cost(&st.content) } else { 0 };
        if after >= before {
            self.dirty_bytes.fetch_add(after - before, Relaxed);
        } else {
            self.dirty_bytes.fetch_sub(before - after, Relaxed);
        }
        result
    }

    /// Deletes the blocks that became zeros in batches, and PUTs the rest concurrently, in
    /// ascending block order.
    fn write_back_slots(&self, mut slots: Vec<SlotRef>, concurrency: usize) -> Result<()> {
        slots.sort_by_key(|(id, _)| *id);
        self.write_back_slots_while(slots, concurrency, &|| true)
    }

    /// As [`write_back_slots`](Self::write_back_slots), in the order given, taking no new block
    /// once `keep_going` says no.
    fn write_back_slots_while(
        &self,
        slots: Vec<SlotRef>,
        concurrency: usize,
        keep_going: &(dyn Fn() -> bool + Sync),
    ) -> Result<()> {
        let (mut zeros, data): (Vec<SlotRef>, Vec<SlotRef>) =
            slots.into_iter().partition(|(_, slot)| matches!(lock(&slot.state).content, Content::Zero));
        zeros.sort_by_key(|(id, _)| *id);
        let deleted = zeros.chunks(DELETE_BATCH).try_for_each(|chunk| self.delete_batch(chunk));
        let written = parallel_while(data, concurrency, keep_going, |(id, slot)| self.write_back_slot(id, &slot));
        deleted.and(written)
    }

    /// Deletes a batch of blocks that became zeros with one storage call.
    fn delete_batch(&self, slots: &[SlotRef]) -> Result<()> {
        // Ascending block order (the caller sorted them), so concurrent batches cannot deadlock.
        let _io: Vec<_> = slots.iter().map(|(_, slot)| lock(&slot.io)).collect();
        let mut batch = Vec::new();
        let mut rewritten = Vec::new();
        for (id, slot) in slots {
            let st = lock(&slot.state);
            match st.content {
                _ if !st.is_dirty() => {}
                Content::Zero => batch.push((*id, slot, st.gen)),
                _ => rewritten.push((*id, slot.clone())),
            }
        }
        let ids: Vec<BlockId> = {
            let index = lock(&self.index);
            batch.iter().map(|(id, _, _)| *id).filter(|id| index.allocated.contains(&id.0)).collect()
        };
        if !ids.is_empty() {
            self.storage.delete_blocks(&ids)?;
        }
        for (id, slot, gen) in batch {
            self.complete(id, slot, gen, false);
        }
        drop(_io);
        // Written again since the batch was chosen: these go the ordinary way.
        rewritten.iter().try_for_each(|(id, slot)| self.write_back_slot(*id, slot))
    }

    fn write_back_slot(&self, id: BlockId, slot: &Arc<Slot>) -> Result<()> {
        let _io = lock(&slot.io);
        let (content, gen) = {
            let mut st = lock(&slot.state);
            if !st.is_dirty() {
                return Ok(());
            }
            if matches!(st.content, Content::Partial { .. }) {
                self.accounted(&mut st, |st| self.load(id, st))?;
            }
            (st.content.clone(), st.gen)
        };
        let stored = match &content {
            Content::Data(d) if !is_zero(d) => {
                self.storage.write_block(id, d)?;
                true
            }
            Content::Data(_) | Content::Zero => {
                // A block storage does not hold needs no delete.
                if lock(&self.index).allocated.contains(&id.0) {
                    self.storage.delete_block(id)?;
                }
                false
            }
            Content::Unloaded | Content::Partial { .. } => {
                return Err(Error::backend(&self.storage, format!("block {id} is dirty but was never loaded")))
            }
        };
        drop(content);
        self.complete(id, slot, gen, stored);
        Ok(())
    }

    /// Records that storage now holds generation `gen` of block `id` (`stored`: as an object;
    /// otherwise deleted), and moves the slot out of the dirty set if no newer write came.
    fn complete(&self, id: BlockId, slot: &Arc<Slot>, gen: u64, stored: bool) {
        let mut st = lock(&slot.state);
        self.accounted(&mut st, |st| st.stored_gen = gen);
        let mut index = lock(&self.index);
        if stored {
            index.allocated.insert(id.0);
        } else {
            index.allocated.remove(&id.0);
        }
        if !st.is_dirty() {
            if let Some(slot) = index.dirty.pop(&id) {
                if matches!(st.content, Content::Zero) {
                    // Not allocated any more: a fresh lookup reads zeros without a slot.
                    st.evicted = true;
                } else {
                    index.clean.push(id, slot);
                    self.evict_excess(&mut index);
                }
            }
        }
    }

    /// Runs `f` on block `id`'s locked state, keeping the index in step with its dirtiness.
    ///
    /// Without `create`, a block that has no slot and is not stored needs none: `f` is not run
    /// and the result is `None` (the block reads as zeros).
    fn with_slot<R>(
        &self,
        id: BlockId,
        create: bool,
        f: impl FnOnce(&mut SlotState) -> Result<R>,
    ) -> Result<Option<R>> {
        loop {
            let Some(slot) = self.slot(id, create) else { return Ok(None) };
            let mut st = lock(&slot.state);
            if st.evicted {
                continue;
            }
            if create {
                // Before the bytes change: a read must not find the old ones, and a buffer the
                // table no longer shares is written in place rather than copied.
                self.hits.remove(id);
            }
            let was_dirty = st.is_dirty();
            let result = self.accounted(&mut st, f);
            if st.is_dirty() && !was_dirty {
                let mut index = lock(&self.index);
                if let Some(slot) = index.clean.pop(&id) {
                    index.dirty.push(id, slot);
                }
            } else if !st.is_dirty() && matches!(st.content, Content::Zero) {
                // A clean block of zeros (a hole that was read, or a write of zeros over a hole)
                // is worth nothing in the cache.
                let mut index = lock(&self.index);
                if index.clean.pop(&id).is_some() {
                    st.evicted = true;
                }
            }
            return result.map(Some);
        }
    }

    /// The slot of block `id`; created (and the LRU trimmed) if it has none and either `create`
    /// is set or storage holds the block.
    fn slot(&self, id: BlockId, create: bool) -> Option<Arc<Slot>> {
        let mut index = lock(&self.index);
        if let Some(slot) = index.dirty.peek(&id) {
            return Some(slot.clone());
        }
        if let Some(slot) = index.clean.get(&id) {
            return Some(slot.clone());
        }
        if !create && !index.allocated.contains(&id.0) {
            return None;
        }
        let slot = Arc::new(Slot {
            io: Mutex::new(()),
            state: Mutex::new(SlotState { content: Content::Unloaded, gen: 0, stored_gen: 0, evicted: false }),
        });
        index.clean.push(id, slot.clone());
        self.evict_excess(&mut index);
        Some(slot)
    }

    /// Drops least recently used clean slots beyond `capacity`, skipping slots in use and never
    /// touching the most recently used one (the caller's).
    fn evict_excess(&self, index: &mut Index) {
        let mut budget = index.clean.len().saturating_sub(1);
        while index.clean.len() > self.capacity && budget > 0 {
            budget -= 1;
            let Some((id, slot)) = index.clean.pop_lru() else { break };
            let evicted = match slot.state.try_lock() {
                Ok(mut st) if !st.is_dirty() => {
                    st.evicted = true;
                    self.hits.remove(id);
                    true
                }
                _ => false,
            };
            if !evicted {
                index.clean.push(id, slot);
            }
        }
    }

    /// Reads block `id` into a slot that has not been read yet, or completes a partial one with
    /// the stored bytes it lacks; a block storage does not hold becomes zeros without a request.
    fn load(&self, id: BlockId, st: &mut SlotState) -> Result<()> {
        if !matches!(st.content, Content::Unloaded | Content::Partial { .. }) {
            self.stats.hits.fetch_add(1, Relaxed);
            return Ok(());
        }
        let stored = lock(&self.index).allocated.contains(&id.0);
        let mut buf = if stored {
            self.stats.misses.fetch_add(1, Relaxed);
            // Storage overwrites all of it.
            let mut buf = BlockBuf::recycled(self.block_size);
            self.storage.read_block(id, &mut buf)?;
            buf
        } else {
            self.stats.holes.fetch_add(1, Relaxed);
            if !matches!(st.content, Content::Partial { .. }) {
                st.content = Content::Zero;
                return Ok(());
            }
            BlockBuf::zeroed(self.block_size)
        };
        if let Content::Partial { data, valid } = &st.content {
            self.stats.read_modify_writes.fetch_add(1, Relaxed);
            for v in valid {
                buf[v.clone()].copy_from_slice(&data[v.clone()]);
            }
        }
        st.content = if is_zero(&buf) { Content::Zero } else { Content::Data(Arc::new(buf)) };
        Ok(())
    }

    /// The bytes `offset..offset + len` of a block, checked so that indexing with them cannot panic.
    fn range(&self, id: BlockId, offset: usize, len: usize) -> Result<Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.block_size => Ok(offset..end),
            _ => Err(Error::backend(&self.storage, format!("{len} bytes at {offset} do not fit in block {id}"))),
        }
    }
}

/// Adds `r` to the sorted, disjoint ranges `valid`, merging ranges that overlap or touch.
fn add_range(valid: &mut Vec<Range<usize>>, r: Range<usize>) {
    valid.push(r);
    valid.sort_unstable_by_key(|v| v.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(valid.len());
    for v in valid.drain(..) {
        match merged.last_mut() {
            Some(last) if v.start <= last.end => last.end = last.end.max(v.end),
            _ => merged.push(v),
        }
    }
    *valid = merged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[test]
    fn the_hit_table_lets_go_of_evicted_blocks() {
        let storage = Arc::new(MemoryStorage::new(4096));
        for b in 0..8u8 {
            storage.write_block(BlockId(b.into()), &[b + 1; 4096]).unwrap();
        }
        // Three clean blocks, a table of four entries: block 4 is evicted while it still has
        // an entry of its own.
        let cache = BlockCache::new(storage, 3, 8, 1).unwrap();
        let mut out = [0u8; 16];
        for b in 0..8u8 {
            cache.read(BlockId(b.into()), 0, &mut out).unwrap();
            assert_eq!(out, [b + 1; 16]);
        }
        let index = lock(&cache.index);
        for b in 0..8 {
            if cache.hits.copy(BlockId(b), 0..16, &mut out) {
                assert!(index.clean.contains(&BlockId(b)), "evicted block {b} still holds memory in the table");
            }
        }
    }
}

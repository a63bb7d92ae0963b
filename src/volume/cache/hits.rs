//! `HitTable`: the blocks whose bytes a read may copy without going through the cache's index.
//!
//! Why: a cached read through the index takes the export-wide index mutex, probes a hash table
//! and moves the block to the front of the LRU list; over tens of thousands of blocks each of
//! those steps is a cache-missing load, and `perf` put about a tenth of the process there on
//! 4K random reads that all hit. Here a block can sit only in entry `block mod len`, each entry
//! behind its own mutex, holding the block's bytes: a hit locks one entry nobody else wants,
//! compares the block number and copies. Measured (docs/PERFORMANCE.md): 1.2-1.3x the cached 4K
//! reads of the index alone on four connections, where readers contended for its mutex; no
//! change on one.
//!
//! An entry keeps the address of the block's bytes beside the buffer that owns them, and is 32
//! bytes aligned to 32: a hit touches one cache line of the table and then the bytes, where going
//! through the buffer's header first (another allocation, another cache miss) made the copy the
//! process's largest symbol on 4K random reads.
//!
//! The table is an accelerator, never the authority: the cache's index still decides what is
//! resident and what is evicted. An entry holds the same shared buffer as its block's slot, so
//! it costs no memory of its own, and the cache keeps it true: a reader that loaded the block
//! publishes it, a writer takes the block out before it changes the bytes (so a write never has
//! to copy a buffer the table shares), and eviction takes it out with the slot. Two blocks that
//! map to one entry take turns; the loser's reads go the long way.
//!
//! An entry's mutex is a leaf: nothing else is locked while it is held.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::block_buf::BlockBuf;
use crate::lock;
use crate::storage::BlockId;

/// At most this many entries (32 bytes each): beyond it, blocks share entries.
const MAX_ENTRIES: usize = 1 << 22;

/// A block in the table: its number, and its bytes.
#[derive(Debug)]
struct Held {
    id: BlockId,
    /// Where `_owner`'s bytes are: the buffer is shared and never changed while the table holds
    /// it (a writer takes it out first), so the address stays good as long as `_owner` is here.
    bytes: NonNull<u8>,
    /// Held, never read: it keeps `bytes` alive.
    _owner: Arc<BlockBuf>,
}

// SAFETY: `bytes` points into `_owner`, which is `Send`; it is only read, under the entry's mutex.
unsafe impl Send for Held {}

/// One entry; two share a cache line, and none straddles two.
#[derive(Debug)]
#[repr(align(32))]
struct Entry(Mutex<Option<Held>>);

/// A direct-mapped table from block to its resident bytes.
#[derive(Debug)]
pub(super) struct HitTable {
    entries: Box<[Entry]>,
    /// `entries.len() - 1`; the length is a power of two.
    mask: u64,
    /// The length of every block; a buffer of another length is never published.
    block_size: usize,
}

impl HitTable {
    /// A table with an entry for each of `blocks` consecutive blocks (rounded up to a power of
    /// two, at most [`MAX_ENTRIES`]) of `block_size` bytes.
    pub(super) fn new(blocks: usize, block_size: usize) -> Self {
        let len = blocks.clamp(1, MAX_ENTRIES).next_power_of_two();
        HitTable { entries: (0..len).map(|_| Entry(Mutex::new(None))).collect(), mask: len as u64 - 1, block_size }
    }

    fn entry(&self, id: BlockId) -> &Mutex<Option<Held>> {
        // Below `len`, so the cast keeps every bit.
        &self.entries[(id.0 & self.mask) as usize].0
    }

    /// Copies the bytes `range` of block `id` into `out` if the table holds the block.
    pub(super) fn copy(&self, id: BlockId, range: Range<usize>, out: &mut [u8]) -> bool {
        match &*lock(self.entry(id)) {
            Some(held) if held.id == id => {
                // SAFETY: `bytes` is the address of `held._owner`'s `block_size` bytes (checked at
                // `publish`), which stay put and unchanged while the entry, locked here, holds it.
                let bytes = unsafe { std::slice::from_raw_parts(held.bytes.as_ptr(), self.block_size) };
                out.copy_from_slice(&bytes[range]);
                true
            }
            _ => false,
        }
    }

    /// Records that block `id` holds `data`, in place of whatever block held its entry.
    pub(super) fn publish(&self, id: BlockId, data: &Arc<BlockBuf>) {
        if data.len() != self.block_size {
            return;
        }
        let bytes = NonNull::from(&data[..]).cast::<u8>();
        let previous = lock(self.entry(id)).replace(Held { id, bytes, _owner: data.clone() });
        // Dropped after the entry's lock: the last reference may return a buffer to the pool.
        drop(previous);
    }

    /// Takes block `id` out of the table, if it is there.
    pub(super) fn remove(&self, id: BlockId) {
        let previous = {
            let mut entry = lock(self.entry(id));
            if entry.as_ref().is_some_and(|held| held.id == id) {
                entry.take()
            } else {
                None
            }
        };
        drop(previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(byte: u8) -> Arc<BlockBuf> {
        Arc::new(BlockBuf::copy_of(&[byte; 8]))
    }

    #[test]
    fn a_published_block_is_copied_until_removed_or_displaced() {
        let table = HitTable::new(3, 8);
        let mut out = [0u8; 4];
        assert!(!table.copy(BlockId(1), 2..6, &mut out), "empty");
        table.publish(BlockId(1), &buf(7));
        assert!(table.copy(BlockId(1), 2..6, &mut out));
        assert_eq!(out, [7; 4]);
        assert!(!table.copy(BlockId(5), 0..4, &mut out), "same entry (4 entries), other block");
        table.remove(BlockId(5));
        assert!(table.copy(BlockId(1), 0..4, &mut out), "removing another block leaves it");
        table.publish(BlockId(5), &buf(9));
        assert!(!table.copy(BlockId(1), 0..4, &mut out), "displaced");
        table.remove(BlockId(5));
        assert!(!table.copy(BlockId(5), 0..4, &mut out), "removed");
    }

    #[test]
    fn a_buffer_of_another_length_is_not_published() {
        let table = HitTable::new(4, 16);
        table.publish(BlockId(1), &buf(7));
        assert!(!table.copy(BlockId(1), 0..4, &mut [0u8; 4]));
    }

    #[test]
    fn an_entry_fills_half_a_cache_line() {
        assert_eq!((std::mem::size_of::<Entry>(), std::mem::align_of::<Entry>()), (32, 32));
    }
}

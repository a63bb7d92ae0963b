//! `HitTable`: the blocks whose bytes a read may copy without going through the cache's index.
//!
//! Why: a cached read through the index takes the export-wide index mutex, probes a hash table
//! and moves the block to the front of the LRU list; over tens of thousands of blocks each of
//! those steps is a cache-missing load, and `perf` put about a tenth of the process there on
//! 4K random reads that all hit. Here a block can sit only in entry `block mod len`, each entry
//! behind its own mutex, holding the block's bytes: a hit locks one entry nobody else wants,
//! compares the block number and copies, touching one line of the table, the buffer's header
//! and the bytes. Measured (docs/PERFORMANCE.md): 1.2-1.3x the cached 4K reads of the index
//! alone on four connections, where readers contended for its mutex; no change on one.
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
use std::sync::{Arc, Mutex};

use crate::block_buf::BlockBuf;
use crate::lock;
use crate::storage::BlockId;

/// At most this many entries (24 bytes each): beyond it, blocks share entries.
const MAX_ENTRIES: usize = 1 << 22;

/// One entry: the block it holds, and that block's bytes.
type Entry = Mutex<Option<(BlockId, Arc<BlockBuf>)>>;

/// A direct-mapped table from block to its resident bytes.
#[derive(Debug)]
pub(super) struct HitTable {
    entries: Box<[Entry]>,
    /// `entries.len() - 1`; the length is a power of two.
    mask: u64,
}

impl HitTable {
    /// A table with an entry for each of `blocks` consecutive blocks (rounded up to a power of
    /// two, at most [`MAX_ENTRIES`]).
    pub(super) fn new(blocks: usize) -> Self {
        let len = blocks.clamp(1, MAX_ENTRIES).next_power_of_two();
        HitTable { entries: (0..len).map(|_| Mutex::new(None)).collect(), mask: len as u64 - 1 }
    }

    fn entry(&self, id: BlockId) -> &Entry {
        // Below `len`, so the cast keeps every bit.
        &self.entries[(id.0 & self.mask) as usize]
    }

    /// Copies the bytes `range` of block `id` into `out` if the table holds the block.
    pub(super) fn copy(&self, id: BlockId, range: Range<usize>, out: &mut [u8]) -> bool {
        match &*lock(self.entry(id)) {
            Some((held, data)) if *held == id => {
                out.copy_from_slice(&data[range]);
                true
            }
            _ => false,
        }
    }

    /// Records that block `id` holds `data`, in place of whatever block held its entry.
    pub(super) fn publish(&self, id: BlockId, data: &Arc<BlockBuf>) {
        let previous = lock(self.entry(id)).replace((id, data.clone()));
        // Dropped after the entry's lock: the last reference may return a buffer to the pool.
        drop(previous);
    }

    /// Takes block `id` out of the table, if it is there.
    pub(super) fn remove(&self, id: BlockId) {
        let previous = {
            let mut entry = lock(self.entry(id));
            if entry.as_ref().is_some_and(|(held, _)| *held == id) {
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
        let table = HitTable::new(3);
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
}

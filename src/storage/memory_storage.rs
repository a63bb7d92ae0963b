//! `MemoryStorage`: blocks of one export in a map in RAM, for the tests of the layers above
//! storage (the cache, the volume, the decorators) that need a block store and nothing else. Not
//! in the release library: `storage=memory` keeps its blocks as objects (`MemoryBackend`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use super::{check_len, BlockBuf, BlockId, Capabilities, Storage};
use crate::{lock, Result};

/// Blocks of one export in a `BTreeMap`; gone when the process exits.
#[derive(Debug)]
pub struct MemoryStorage {
    block_size: usize,
    /// Stored blocks; absent keys read as zeros.
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

impl MemoryStorage {
    /// An empty store of `block_size`-byte blocks.
    pub fn new(block_size: usize) -> Self {
        MemoryStorage { block_size, blocks: Mutex::new(BTreeMap::new()) }
    }
}

impl fmt::Display for MemoryStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemoryStorage")
    }
}

impl Storage for MemoryStorage {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool> {
        check_len(self, self.block_size, buf.len())?;
        match lock(&self.blocks).get(&id.0) {
            Some(data) => {
                buf.copy_from_slice(data);
                Ok(true)
            }
            None => {
                buf.fill(0);
                Ok(false)
            }
        }
    }

    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()> {
        check_len(self, self.block_size, data.len())?;
        lock(&self.blocks).insert(id.0, data.into());
        Ok(())
    }

    fn delete_block(&self, id: BlockId) -> Result<()> {
        lock(&self.blocks).remove(&id.0);
        Ok(())
    }

    fn list_blocks(&self) -> Result<Vec<BlockId>> {
        Ok(lock(&self.blocks).keys().map(|&k| BlockId(k)).collect())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { slow_requests: false, sliced_listing: false, atomic_flush: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;

    #[test]
    fn conformance() {
        conformance::run_all(&|_| Box::new(MemoryStorage::new(conformance::BLOCK_SIZE)), false);
    }
}

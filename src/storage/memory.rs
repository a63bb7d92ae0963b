//! `MemoryStorage`: blocks in a map in RAM, for tests and throw-away devices.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use super::{check_len, Backend, BlockBuf, BlockId, Capabilities, Expect, Storage, VersionedText};
use crate::export::ExportName;
use crate::{lock, Result};

/// The exports of one process, in RAM.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    /// Each export's blocks, kept so a second open reaches the same data.
    exports: Mutex<BTreeMap<ExportName, Arc<MemoryStorage>>>,
    /// Each export's record.
    records: Mutex<BTreeMap<ExportName, String>>,
    /// Each export's lease; its text is its version.
    leases: Mutex<BTreeMap<ExportName, String>>,
}

impl fmt::Display for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemoryBackend")
    }
}

impl Backend for MemoryBackend {
    fn open(&self, export: &ExportName, block_size: usize) -> Result<Arc<dyn Storage>> {
        let mut exports = lock(&self.exports);
        let storage = exports.entry(export.clone()).or_insert_with(|| Arc::new(MemoryStorage::new(block_size)));
        Ok(storage.clone())
    }

    fn read_record(&self, export: &ExportName) -> Result<Option<String>> {
        Ok(lock(&self.records).get(export).cloned())
    }

    fn write_record(&self, export: &ExportName, record: &str) -> Result<()> {
        lock(&self.records).insert(export.clone(), record.to_string());
        Ok(())
    }

    fn delete_record(&self, export: &ExportName) -> Result<()> {
        lock(&self.records).remove(export);
        lock(&self.leases).remove(export);
        lock(&self.exports).remove(export);
        Ok(())
    }

    fn list_exports(&self) -> Result<Vec<ExportName>> {
        Ok(lock(&self.records).keys().cloned().collect())
    }

    fn read_lease(&self, export: &ExportName) -> Result<Option<VersionedText>> {
        Ok(lock(&self.leases).get(export).map(|text| VersionedText { text: text.clone(), version: text.clone() }))
    }

    fn replace_lease(&self, export: &ExportName, expected: Expect<'_>, text: &str) -> Result<Option<String>> {
        let mut leases = lock(&self.leases);
        let current = leases.get(export).map(String::as_str);
        let as_expected = match expected {
            Expect::Absent => current.is_none(),
            Expect::Version(v) => current == Some(v),
        };
        Ok(as_expected.then(|| {
            leases.insert(export.clone(), text.to_string());
            text.to_string()
        }))
    }

    fn atomic_leases(&self) -> Result<bool> {
        Ok(true)
    }
}

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
        Capabilities { slow_requests: false, sliced_listing: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;

    #[test]
    fn conformance() {
        conformance::run_all(&|_| Box::new(MemoryStorage::new(conformance::BLOCK_SIZE)), false);
        conformance::backend_records(&MemoryBackend::default(), "");
        conformance::backend_leases(&MemoryBackend::default(), "");
    }
}

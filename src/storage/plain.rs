//! `PlainStorage`: the `plain` block layout, one object per stored block, at
//! `blocks/{export}/{byte offset:016x}` (see [`keys`](super::keys)), over any [`ObjectStore`].
//!
//! The layout is written once, against the object layer, so every store that keeps objects (a
//! bucket, a directory, RAM) stores blocks the same way, and the checks on what comes back (a
//! block of the wrong size is corrupt, not a panic) are made in one place.

use std::fmt;
use std::sync::Arc;

use super::keys::parse_block_leaf;
use super::objects::{Listed, ObjectStore, Put, ReadInto};
use super::{check_len, BlockBuf, BlockId, Capabilities, Fence, Storage};
use crate::export_name::ExportName;
use crate::{Error, Result};

/// The blocks of one export, one object each.
#[derive(Debug)]
pub struct PlainStorage {
    objects: Arc<dyn ObjectStore>,
    export: ExportName,
    block_size: usize,
    /// `{objects}/blocks/{export}/`, for messages.
    name: String,
}

impl PlainStorage {
    /// The blocks of `export` in `objects`, `block_size` bytes each.
    pub fn new(objects: Arc<dyn ObjectStore>, export: &ExportName, block_size: usize) -> Self {
        let name = format!("{objects}/{}", export.block_prefix());
        PlainStorage { objects, export: export.clone(), block_size, name }
    }

    fn key(&self, id: BlockId) -> String {
        self.export.block_key(id, self.block_size)
    }
}

impl fmt::Display for PlainStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Storage for PlainStorage {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool> {
        check_len(self, self.block_size, buf.len())?;
        let key = self.key(id);
        match self.objects.read_into(&key, None, buf)? {
            ReadInto::Filled => Ok(true),
            ReadInto::Missing => {
                buf.fill(0);
                Ok(false)
            }
            ReadInto::WrongSize(size) => Err(Error::CorruptBlock {
                store: self.objects.to_string(),
                key,
                message: format!("it is {size} bytes, expected {}", self.block_size),
            }),
        }
    }

    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()> {
        check_len(self, self.block_size, data.len())?;
        self.objects.put(&self.key(id), data, Put::Always, None).map(drop)
    }

    fn delete_block(&self, id: BlockId) -> Result<()> {
        self.objects.delete(&[self.key(id)], None)
    }

    fn delete_blocks(&self, ids: &[BlockId]) -> Result<()> {
        self.objects.delete(&ids.iter().map(|&id| self.key(id)).collect::<Vec<_>>(), None)
    }

    fn write_block_fenced(&self, id: BlockId, data: &[u8], fence: Fence<'_>) -> Result<()> {
        check_len(self, self.block_size, data.len())?;
        self.objects.put(&self.key(id), data, Put::Always, Some(fence)).map(drop)
    }

    fn delete_block_fenced(&self, id: BlockId, fence: Fence<'_>) -> Result<()> {
        self.objects.delete(&[self.key(id)], Some(fence))
    }

    fn delete_blocks_fenced(&self, ids: &[BlockId], fence: Fence<'_>) -> Result<()> {
        self.objects.delete(&ids.iter().map(|&id| self.key(id)).collect::<Vec<_>>(), Some(fence))
    }

    fn list_blocks(&self) -> Result<Vec<BlockId>> {
        self.list_blocks_in(0..u64::MAX)
    }

    fn list_blocks_in(&self, range: std::ops::Range<u64>) -> Result<Vec<BlockId>> {
        let prefix = self.export.block_prefix();
        // Keys sort like their offsets (fixed-width hex), so the listing can start at the range.
        let start_after = range.start.checked_sub(1).map(|before| self.key(BlockId(before)));
        let mut ids = Vec::new();
        self.objects.list(&prefix, start_after.as_deref(), &mut |listed: Listed| {
            let leaf = listed.key.strip_prefix(&prefix).unwrap_or_default();
            match parse_block_leaf(leaf, self.block_size) {
                Some(id) if id.0 >= range.end => return false,
                Some(id) => ids.push(id),
                None => log::debug!("{self}: ignoring stray object {}", listed.key),
            }
            true
        })?;
        Ok(ids)
    }

    fn flush(&self) -> Result<()> {
        self.objects.sync()
    }

    fn retries(&self) -> u64 {
        self.objects.retries()
    }

    fn capabilities(&self) -> Capabilities {
        self.objects.capabilities()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{conformance, MemoryObjects};

    #[test]
    fn conformance_over_memory_objects() {
        let objects: Arc<dyn ObjectStore> = Arc::new(MemoryObjects::default());
        conformance::run_all(
            &|place| {
                let export = ExportName::new(&format!("place{place}")).unwrap();
                Box::new(PlainStorage::new(Arc::clone(&objects), &export, conformance::BLOCK_SIZE))
            },
            true,
        );
    }

    #[test]
    fn an_object_of_the_wrong_size_is_a_corrupt_block_named_by_its_key() {
        let objects: Arc<dyn ObjectStore> = Arc::new(MemoryObjects::default());
        let s = PlainStorage::new(Arc::clone(&objects), &ExportName::new("dev").unwrap(), 4096);
        objects.put("blocks/dev/0000000000002000", b"short", Put::Always, None).unwrap();
        let e = s.read_block(BlockId(2), &mut BlockBuf::zeroed(4096)).unwrap_err();
        assert!(matches!(&e, Error::CorruptBlock { key, .. } if key == "blocks/dev/0000000000002000"), "{e}");
        assert!(e.to_string().contains("is 5 bytes, expected 4096"), "{e}");
    }
}

//! `FaultyStorage`: a test decorator that counts calls and fails the ones a test chooses.
//!
//! Tests use it to prove that errors surface as `Err` and never corrupt data, and to assert how
//! many reads, writes and deletes reached storage.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use super::{BlockBuf, BlockId, Capabilities, Storage};
use crate::{Error, Result};

/// Wraps `inner`, counting calls and failing chosen ones with [`Error::Backend`].
#[derive(Debug)]
pub struct FaultyStorage<S> {
    inner: S,
    /// Fail every read while set.
    pub fail_reads: AtomicBool,
    /// Fail every write and delete while set.
    pub fail_writes: AtomicBool,
    /// When non-zero, fail every `fail_one_in`-th call of any kind.
    pub fail_one_in: AtomicU64,
    /// Chosen calls panic instead of failing: a bug below the layer under test.
    pub panic_instead: AtomicBool,
    /// Calls of `read_block`.
    pub reads: AtomicU64,
    /// Calls of `write_block`.
    pub writes: AtomicU64,
    /// Calls of `delete_block`.
    pub deletes: AtomicU64,
    /// Calls of `flush`.
    pub flushes: AtomicU64,
    calls: AtomicU64,
    /// What the store claims to be instead of what `inner` is (see [`posing_as`](Self::posing_as)).
    posing_as: Option<Capabilities>,
}

impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner` with no faults.
    pub fn new(inner: S) -> Self {
        FaultyStorage {
            inner,
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_one_in: AtomicU64::new(0),
            panic_instead: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            posing_as: None,
        }
    }

    /// Claims `capabilities` instead of the inner store's: RAM posing as a remote store, so that
    /// a test sees what the layers above do for one.
    pub fn posing_as(self, capabilities: Capabilities) -> Self {
        FaultyStorage { posing_as: Some(capabilities), ..self }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn check(&self, what: &str, forced: &AtomicBool, id: Option<BlockId>) -> Result<()> {
        let n = self.calls.fetch_add(1, Relaxed) + 1;
        let one_in = self.fail_one_in.load(Relaxed);
        if forced.load(Relaxed) || (one_in != 0 && n % one_in == 0) {
            let block = id.map(|b| format!(" of block {b}")).unwrap_or_default();
            if self.panic_instead.load(Relaxed) {
                panic!("injected panic in {what}{block}");
            }
            return Err(Error::backend(self, format!("injected fault in {what}{block}")));
        }
        Ok(())
    }
}

impl<S: Storage> fmt::Display for FaultyStorage<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStorage({})", self.inner)
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool> {
        self.reads.fetch_add(1, Relaxed);
        self.check("read", &self.fail_reads, Some(id))?;
        self.inner.read_block(id, buf)
    }

    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()> {
        self.writes.fetch_add(1, Relaxed);
        self.check("write", &self.fail_writes, Some(id))?;
        self.inner.write_block(id, data)
    }

    fn delete_block(&self, id: BlockId) -> Result<()> {
        self.deletes.fetch_add(1, Relaxed);
        self.check("delete", &self.fail_writes, Some(id))?;
        self.inner.delete_block(id)
    }

    fn delete_blocks(&self, ids: &[BlockId]) -> Result<()> {
        self.deletes.fetch_add(ids.len() as u64, Relaxed);
        self.check("delete", &self.fail_writes, ids.first().copied())?;
        self.inner.delete_blocks(ids)
    }

    fn list_blocks(&self) -> Result<Vec<BlockId>> {
        self.check("list", &self.fail_reads, None)?;
        self.inner.list_blocks()
    }

    fn list_blocks_in(&self, range: std::ops::Range<u64>) -> Result<Vec<BlockId>> {
        self.check("list", &self.fail_reads, None)?;
        self.inner.list_blocks_in(range)
    }

    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Relaxed);
        self.check("flush", &self.fail_writes, None)?;
        self.inner.flush()
    }

    fn retries(&self) -> u64 {
        self.inner.retries()
    }

    fn capabilities(&self) -> Capabilities {
        self.posing_as.unwrap_or_else(|| self.inner.capabilities())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{conformance, MemoryStorage};

    #[test]
    fn conformance_with_faults_off() {
        conformance::run_all(&|_| Box::new(FaultyStorage::new(MemoryStorage::new(conformance::BLOCK_SIZE))), false);
    }

    #[test]
    fn injected_faults_surface_as_errors() {
        let s = FaultyStorage::new(MemoryStorage::new(512));
        s.fail_writes.store(true, Relaxed);
        let e = s.write_block(BlockId(4), &[1; 512]).unwrap_err();
        assert_eq!(e.to_string(), "FaultyStorage(MemoryStorage): injected fault in write of block 0000000000000004");
        assert!(s.inner().list_blocks().unwrap().is_empty());
    }
}

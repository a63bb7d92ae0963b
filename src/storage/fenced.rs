//! `FencedStorage`: lets writes through only while this process holds the export's lease.
//!
//! The lease is checked where blocks are written, not only where NBD requests arrive, because
//! write-back happens later, on other threads: a process that lost its lease while it held dirty
//! blocks must not write them over its successor's.
//!
//! Checking is not enough: the lease's promise (see [`crate::lease`]) is that a write allowed at
//! `t` has landed or failed by `t + s3-timeout`, before anyone else may take the lease over. A
//! write allowed and then queued behind slow requests for one of the `s3-concurrency` request
//! slots, or a process frozen (SIGSTOP, a paused VM) between the check and the send, would go out
//! later than that. So the check is handed down as a fence ([`Storage::write_block_fenced`]):
//! the store asks the lease once it holds a slot, right before the request, and gets a deadline
//! on the monotonic clock, `s3-timeout` from then. It sends no byte of the request, on its first
//! attempt or any retry, once that deadline has passed: the last look at the clock comes right
//! before bytes are written to the socket (`DirectClient`'s writes, the SDK's
//! `read_before_transmit`). A pause anywhere before that look is caught by it, because the
//! monotonic clock runs on while the process is frozen. On the direct path a pause after it can
//! only delay bytes already handed to the kernel; the SDK writes a body after its hook, and its
//! operation timeout, set to the same deadline, cuts the connection there, so a server gets at
//! most a truncated PUT, which it discards. What the deadline cannot bound is a server that applies a PUT
//! it has fully received long after: the lease assumes S3 applies a request within `s3-timeout`
//! of receiving it.
//!
//! The slot wait does not count against the request: a write that waited long for its slot gets
//! a fresh deadline, or is refused if the lease's window ended meanwhile.

use std::fmt;
use std::sync::Arc;

use std::time::Instant;

use super::{BlockBuf, BlockId, Capabilities, Storage};
use crate::Result;

/// What decides whether a write may go out now: the export's lease (see
/// [`Lease`](crate::lease::Lease), which implements this), seen from the storage layer, which
/// must not depend on how the lease is kept.
pub trait WriteWindow: fmt::Debug + Send + Sync {
    /// When a write allowed now must be sent by, or why writes are not allowed now.
    ///
    /// # Errors
    /// [`Error::Lease`](crate::Error::Lease) saying why writes are not allowed.
    fn deadline(&self) -> Result<Instant>;
}

/// Wraps a store so that writes, deletes and flushes need the lease.
#[derive(Debug)]
pub struct FencedStorage {
    inner: Arc<dyn Storage>,
    lease: Arc<dyn WriteWindow>,
}

impl FencedStorage {
    /// Fences `inner` with `lease`.
    pub fn new(inner: Arc<dyn Storage>, lease: Arc<dyn WriteWindow>) -> Self {
        FencedStorage { inner, lease }
    }
}

impl fmt::Display for FencedStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Storage for FencedStorage {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool> {
        self.inner.read_block(id, buf)
    }

    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()> {
        self.inner.write_block_fenced(id, data, &|| self.lease.deadline())
    }

    fn delete_block(&self, id: BlockId) -> Result<()> {
        self.inner.delete_block_fenced(id, &|| self.lease.deadline())
    }

    fn delete_blocks(&self, ids: &[BlockId]) -> Result<()> {
        self.inner.delete_blocks_fenced(ids, &|| self.lease.deadline())
    }

    fn list_blocks(&self) -> Result<Vec<BlockId>> {
        self.inner.list_blocks()
    }

    fn list_blocks_in(&self, range: std::ops::Range<u64>) -> Result<Vec<BlockId>> {
        self.inner.list_blocks_in(range)
    }

    fn flush(&self) -> Result<()> {
        self.lease.deadline()?;
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
    use std::time::Duration;

    use super::*;
    use crate::lease::{Lease, LeaseConfig};
    use crate::storage::{conformance, Backend, MemoryBackend, MemoryStorage};
    use crate::ExportName;

    fn lease() -> Arc<Lease> {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let config =
            LeaseConfig { time: Duration::from_secs(60), takeover: false, request_timeout: Duration::from_secs(30) };
        Lease::new(backend, ExportName::new("dev").unwrap(), config)
    }

    #[test]
    fn conformance_while_the_lease_is_held() {
        conformance::run_all(
            &|_| {
                let lease = lease();
                lease.hold().unwrap();
                Box::new(FencedStorage::new(Arc::new(MemoryStorage::new(conformance::BLOCK_SIZE)), lease))
            },
            false,
        );
    }

    #[test]
    fn without_the_lease_only_reads_pass() {
        let lease = lease();
        let s = FencedStorage::new(Arc::new(MemoryStorage::new(512)), lease.clone());
        for e in [
            s.write_block(BlockId(1), &[1; 512]).unwrap_err(),
            s.delete_block(BlockId(1)).unwrap_err(),
            s.delete_blocks(&[BlockId(1)]).unwrap_err(),
            s.flush().unwrap_err(),
        ] {
            assert!(e.to_string().starts_with("export dev: this process does not hold the lease"), "{e}");
        }
        assert!(!s.read_block(BlockId(1), &mut BlockBuf::zeroed(512)).unwrap());
        assert!(s.list_blocks().unwrap().is_empty());
        lease.hold().unwrap();
        s.write_block(BlockId(1), &[1; 512]).unwrap();
        lease.release();
        assert!(s.write_block(BlockId(1), &[2; 512]).unwrap_err().to_string().contains("released"));
    }
}

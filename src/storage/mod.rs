//! The block-only storage layer: one trait, and the backends that implement it side by side.
//!
//! A [`Storage`] is bound to one export and one block size when it is opened. Every call reads
//! or writes exactly one whole block; byte offsets, partial blocks and caching live above it, in
//! the [`Volume`](crate::Volume). That keeps each backend small: the memory, file and S3 backends
//! differ only in where a block's bytes go.
//!
//! Beneath the blocks is the object layer ([`objects`]): a bucket ([`S3Objects`]), a directory
//! ([`DirObjects`]) or RAM ([`MemoryObjects`]) is an [`ObjectStore`], on which the one
//! [`ObjectBackend`] keeps every export's record and lease, and the [`PlainStorage`] layout its
//! blocks.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

pub use crate::block_buf::BlockBuf;
use crate::export_name::ExportName;
use crate::Result;

pub mod cas;
pub mod fenced;
pub mod keys;
pub mod memory;
#[cfg(any(test, feature = "testing"))]
pub mod memory_storage;
pub mod metered;
pub mod object_backend;
pub mod objects;
pub mod plain;
pub mod s3;

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(any(test, feature = "testing"))]
pub mod faulty;

pub use fenced::{FencedStorage, WriteWindow};
pub use memory::MemoryBackend;
#[cfg(any(test, feature = "testing"))]
pub use memory_storage::MemoryStorage;
pub use metered::{MeteredStorage, StorageStats};
pub use object_backend::ObjectBackend;
pub use objects::{DirObjects, MemoryObjects, ObjectStore};
pub use plain::PlainStorage;
pub use s3::{S3Config, S3Objects, Secret};

/// The index of a block in its export: block `n` covers bytes `n * block_size ..`.
///
/// It displays as that index in decimal. Messages about a stored block (errors, logs) name it by
/// its key instead (`blocks/{export}/{byte offset in hex}`, see [`keys`]), which is what a user
/// finds in the bucket or directory; where both appear, the index is the decimal one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u64);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where the blocks of one export live.
///
/// # Contract
/// * `buf` and `data` are exactly [`block_size`](Storage::block_size) bytes long; callers never
///   pass anything else, and a backend returns [`Error::Backend`](crate::Error::Backend) if one does.
/// * A block never written, or deleted, reads as all zeros and `read_block` returns `Ok(false)`.
/// * Callers never write an all-zero block: they delete it instead, so storage stays sparse.
/// * `delete_block` of a missing block is not an error; deleting is idempotent.
/// * Each `write_block` is atomic: after a crash a block holds its old or its new bytes, never a
///   mix.
/// * After `flush` returns `Ok`, every earlier successful write and delete survives a crash and a
///   new instance opened on the same place.
/// * Calls for distinct blocks may run concurrently from many threads. Callers never run two
///   calls for the same block at once.
/// * A block whose stored bytes have the wrong size is an
///   [`Error::CorruptBlock`](crate::Error::CorruptBlock), never a panic.
pub trait Storage: Send + Sync + fmt::Debug + fmt::Display {
    /// The size of every block of this export, in bytes.
    fn block_size(&self) -> usize;

    /// Reads block `id` into `buf`, returning whether it is stored (`false`: `buf` is zeroed).
    /// Every byte of `buf` is overwritten (callers pass recycled buffers); a backend may also
    /// replace the buffer with one of its own of the same length.
    ///
    /// # Errors
    /// Backend failures, and [`Error::CorruptBlock`](crate::Error::CorruptBlock) for a stored
    /// object of the wrong size.
    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool>;

    /// Stores `data` as block `id`, replacing what was there.
    ///
    /// # Errors
    /// Backend failures; the block then holds its old or its new bytes.
    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()>;

    /// Removes block `id`, so it reads as zeros.
    ///
    /// # Errors
    /// Backend failures.
    fn delete_block(&self, id: BlockId) -> Result<()>;

    /// Removes many blocks; backends with a batch request (S3 DeleteObjects) override this.
    ///
    /// # Errors
    /// Backend failures; some of the blocks may be deleted then.
    fn delete_blocks(&self, ids: &[BlockId]) -> Result<()> {
        ids.iter().try_for_each(|&id| self.delete_block(id))
    }

    /// [`write_block`](Self::write_block), fenced by an export's lease: `fence` is asked right
    /// before the request may go out (after any wait for a request slot), and none of the
    /// request's attempts may be sent after the instant it gives. Stores that write at once
    /// (memory, files) ask it first.
    ///
    /// # Errors
    /// What `fence` says, [`Error::Timeout`](crate::Error::Timeout) for a request its deadline
    /// stopped, and as `write_block`.
    fn write_block_fenced(&self, id: BlockId, data: &[u8], fence: Fence<'_>) -> Result<()> {
        fence()?;
        self.write_block(id, data)
    }

    /// [`delete_block`](Self::delete_block), fenced as [`write_block_fenced`](Self::write_block_fenced).
    ///
    /// # Errors
    /// As `write_block_fenced`.
    fn delete_block_fenced(&self, id: BlockId, fence: Fence<'_>) -> Result<()> {
        fence()?;
        self.delete_block(id)
    }

    /// [`delete_blocks`](Self::delete_blocks), fenced as
    /// [`write_block_fenced`](Self::write_block_fenced): each request of a batch asks `fence`.
    ///
    /// # Errors
    /// As `write_block_fenced`; some of the blocks may be deleted then.
    fn delete_blocks_fenced(&self, ids: &[BlockId], fence: Fence<'_>) -> Result<()> {
        fence()?;
        self.delete_blocks(ids)
    }

    /// The indexes of every stored block, in ascending order.
    ///
    /// # Errors
    /// Backend failures.
    fn list_blocks(&self) -> Result<Vec<BlockId>>;

    /// The indexes of the stored blocks in `range`, in ascending order. Backends that can list a
    /// key range directly (S3's `start-after`) override this, so that a large export can be
    /// listed in slices, in parallel.
    ///
    /// # Errors
    /// Backend failures.
    fn list_blocks_in(&self, range: std::ops::Range<u64>) -> Result<Vec<BlockId>> {
        Ok(self.list_blocks()?.into_iter().filter(|b| range.contains(&b.0)).collect())
    }

    /// Makes every earlier successful write and delete durable.
    ///
    /// # Errors
    /// Backend failures; earlier writes may or may not be durable then.
    fn flush(&self) -> Result<()>;

    /// Requests this store sent again after a transient failure (S3: 5xx, throttling, a dropped
    /// connection, no answer in time), whether or not a later attempt succeeded: what a failing
    /// server cost that the other counters do not show. Stores that never retry count none.
    fn retries(&self) -> u64 {
        0
    }

    /// What this store is like, for the layers above to tune themselves by. The default
    /// describes a remote object store (S3), which is what that tuning is for; local stores say
    /// otherwise, and decorators forward their inner store's.
    fn capabilities(&self) -> Capabilities {
        Capabilities::REMOTE
    }
}

/// What a [`Storage`] is like: what the layers above ask rather than guess it from the request
/// concurrency a user set (which is about how hard to push a server, not about what it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// A block request waits on something slow (a network round trip, a disk, an fsync), so it
    /// pays to overlap requests with the client's: read ahead of sequential readers, write back
    /// behind sequential writers. Not so for RAM, where that only costs copies and threads.
    pub slow_requests: bool,
    /// Listing a key range costs one request per page of keys, so a large export is listed
    /// sooner in slices listed at once (S3 `start-after`); a local store lists in one call.
    pub sliced_listing: bool,
    /// A flush commits everything the store was given as one state (the `cas` layout's head), so
    /// the layers above must give it every acknowledged write before any flush, a FUA write's
    /// included: committing only some would leave, after a crash, a state no FLUSH returned.
    pub atomic_flush: bool,
}

impl Capabilities {
    /// A remote object store: requests take a round trip, listings a page at a time.
    pub const REMOTE: Capabilities = Capabilities { slow_requests: true, sliced_listing: true, atomic_flush: false };
}

/// Says, right before a block write or delete goes out, until when it may be sent (an export
/// lease's [`deadline`](crate::lease::Lease::deadline)), or refuses it.
pub type Fence<'a> = &'a dyn Fn() -> Result<Instant>;

/// A lease's text and the version the backend gave it, for [`Backend::replace_lease`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionedText {
    /// What the holder wrote.
    pub text: String,
    /// Opaque; changes with every write (an S3 ETag, or the text itself).
    pub version: String,
}

/// What [`Backend::replace_lease`] expects to find before it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect<'a> {
    /// No lease at all (S3 `If-None-Match: *`).
    Absent,
    /// The lease at this version (S3 `If-Match: ETag`).
    Version(&'a str),
}

/// Where the exports of one bucket, directory or process live: each export's geometry record,
/// its lease, and its blocks.
///
/// # Contract
/// * An export's record is a short text written once, when the export is created; it says how
///   to open the export's blocks (see [`Geometry::to_record`](crate::Geometry::to_record)).
/// * `list_exports` returns the exports that have a record, in order.
/// * Opening the same export twice reaches the same blocks.
/// * When [`atomic_leases`](Backend::atomic_leases) is true, `replace_lease` is a
///   compare-and-swap: of two callers expecting the same state, at most one succeeds, even in
///   different processes. When it is false the backend cannot tell (an S3 server that ignores
///   conditional writes), and the last writer wins.
pub trait Backend: Send + Sync + fmt::Debug + fmt::Display {
    /// The blocks of `export`, in blocks of `block_size` bytes.
    ///
    /// # Errors
    /// Backend failures.
    fn open(&self, export: &ExportName, block_size: usize) -> Result<Arc<dyn Storage>>;

    /// The record of `export`, or `None` if it has none.
    ///
    /// # Errors
    /// Backend failures.
    fn read_record(&self, export: &ExportName) -> Result<Option<String>>;

    /// Stores the record of `export`.
    ///
    /// # Errors
    /// Backend failures.
    fn write_record(&self, export: &ExportName, record: &str) -> Result<()>;

    /// Removes the record and the lease of `export`; removing a missing one is not an error.
    ///
    /// # Errors
    /// Backend failures.
    fn delete_record(&self, export: &ExportName) -> Result<()>;

    /// Every export that has a record.
    ///
    /// # Errors
    /// Backend failures.
    fn list_exports(&self) -> Result<Vec<ExportName>>;

    /// The lease of `export` (see [`Lease`](crate::lease::Lease)), or `None` if it has none.
    ///
    /// # Errors
    /// Backend failures.
    fn read_lease(&self, export: &ExportName) -> Result<Option<VersionedText>>;

    /// Writes the lease of `export` if it is still as `expected`, returning the new version, or
    /// `None` when it is not (another writer got there first).
    ///
    /// # Errors
    /// Backend failures.
    fn replace_lease(&self, export: &ExportName, expected: Expect<'_>, text: &str) -> Result<Option<String>>;

    /// Whether [`replace_lease`](Backend::replace_lease) really is a compare-and-swap here.
    ///
    /// # Errors
    /// Backend failures while finding out.
    fn atomic_leases(&self) -> Result<bool>;

    /// The object store beneath these exports, for layouts written against the object layer
    /// (`cas`). S3 hands out a store with request slots of its own each time.
    fn objects(&self) -> Arc<dyn ObjectStore>;
}

/// Checks the length of a caller's buffer against the contract, so no backend indexes out of bounds.
pub(crate) fn check_len(store: &dyn fmt::Display, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(crate::Error::backend(store, format!("buffer of {got} bytes where a {expected}-byte block was expected")))
    }
}

/// Whether `data` is all zeros: such a block is deleted rather than stored.
pub fn is_zero(data: &[u8]) -> bool {
    // Comparing word-sized chunks is several times faster than a byte loop on 4 MiB blocks.
    let (head, words, tail) = unsafe { data.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4099]));
        for i in [0, 1, 15, 16, 4000, 4098] {
            let mut v = vec![0u8; 4099];
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            assert!(!is_zero(&v[i..]), "slice from {i}");
        }
    }

    #[test]
    fn block_ids_print_as_decimal_indexes() {
        assert_eq!(BlockId(0x1f).to_string(), "31");
    }
}

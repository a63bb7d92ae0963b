//! nbds3: an nbdkit plugin that serves S3 buckets (or a directory, or RAM) as network block devices.
//!
//! ```text
//!   NBD client (nbd-client, qemu, nbdcopy)
//!        │  NBD protocol
//!   nbdkit (C) ── loads libnbds3.so
//!        │  pread/pwrite/flush/trim/zero callbacks
//!   plugin.rs      thin glue: parameters → Config, Error → errno, panics caught
//!        │
//!   exports.rs     one Volume per export name, shared by all its connections, and the
//!        │         export's Lease (lease.rs): at most one writing process per export
//!   Volume         byte offsets → blocks; partial reads; read-modify-write; FUA; FLUSH;
//!        │         read-ahead and write-behind of sequential streams (volume/streams.rs)
//!   BlockCache     per-block locks, LRU of clean blocks, bounded set of dirty blocks
//!        │  whole blocks only
//!   MeteredStorage counts requests; FencedStorage lets writes through only under the lease
//!   Storage        the export record's layout chooses (export_record.rs): PlainStorage, one
//!        │         object per block at the keys keys.rs lays out; or CasStorage (storage/cas/),
//!        │         content-addressed chunks under a block map committed at each FLUSH.
//!        │         ObjectBackend keeps each export's record and lease beside them
//!   ObjectStore    S3Objects (storage/s3/: one transport seam, SDK │ direct HTTP/1.1; one retry
//!                  policy; one error fold) │ DirObjects │ MemoryObjects
//! ```
//!
//! Imports point down this diagram only (`scripts/check-module-cycles` fails on a cycle): a lower
//! layer names what it needs from a higher one as a type of its own, such as the storage layer's
//! [`WriteWindow`](storage::WriteWindow), which the [`Lease`](lease::Lease) implements.
//!
//! # Why blocks, not objects per file?
//! A block device has no files. Storing fixed-size blocks as objects keyed by their byte offset
//! (`blocks/{export}/{offset:016x}`) makes every NBD request a small set of independent, atomic
//! object operations: a crash can tear a multi-block write, but never a block. All-zero blocks
//! are never stored, so an empty 1 TiB device costs nothing and reads of holes need no request.
//!
//! # Invariants
//! * A write is acknowledged once it is in the `Volume`; after FLUSH returns, every write
//!   acknowledged before it is durable in storage. A FUA write is durable before it is
//!   acknowledged.
//! * Reads see the latest acknowledged write, whether it is dirty, cached or only stored.
//! * Concurrent partial writes to one block never lose an update.
//! * Clean cached data never exceeds `cache-size`; dirty data is written back early once it
//!   reaches `max-dirty`.
//! * Blocks reach storage only while this process holds the export's lease; a process that
//!   lost it fails writes and FLUSH with EIO rather than write over its successor's blocks.
#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations)]

pub mod admin;
mod background;
pub mod block_buf;
pub mod config;
pub mod diff_stream;
pub mod error;
pub mod export_name;
pub mod export_record;
pub mod exports;
#[cfg(test)]
mod fuzz;
pub mod lease;
pub mod logger;
mod parallel;
pub mod param_docs;
mod plugin;
pub mod snapshots;
pub mod stats_file;
pub mod storage;
pub mod volume;

pub use config::Config;
pub use error::{Error, Result};
pub use export_name::ExportName;
pub use storage::{BlockId, Storage};
pub use volume::{Geometry, Volume, VolumeConfig};

/// Locks `m`, ignoring poisoning: a panic elsewhere must not turn every later request into one.
pub(crate) fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Nanoseconds since the Unix epoch, by the wall clock: unique enough for the names of lease
/// tokens and probe objects, which both the lease and the storage layer make.
pub(crate) fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
}

//! The object layer: named immutable-or-replaced byte strings in a bucket (or a directory, or
//! RAM), the one interface every stored format is written against.
//!
//! Block layouts (`plain`: one object per block; `cas`: content-addressed chunks under a map),
//! export records and leases are all made of objects. Writing them against this one small trait,
//! rather than against the S3 client, keeps each format in one place and lets the memory and file
//! stores run every format's tests without a server: the S3 store is one implementation beside
//! the others, and the conformance checks in [`conformance`] hold all of them to the contract.
//!
//! # Contract
//! * Keys are `/`-separated ASCII paths built by the layouts (never from raw user input), at most
//!   512 bytes, with no empty component and no `.` or `..` component.
//! * A `put` replaces the whole object atomically: a reader, or a crash, sees the old or the new
//!   bytes, never a mix. Once `put` returns (and, for stores that need it, a later
//!   [`sync`](ObjectStore::sync) returns), the object survives a crash.
//! * Every `put` gives the object a new version, even when the bytes are the same as before.
//!   Where the store cannot promise that (an S3 ETag is a hash of the bytes), callers that use
//!   [`Put::IfVersion`] must make every write's bytes unique (a generation, the writer's id).
//! * [`Put::IfAbsent`] and [`Put::IfVersion`] are compare-and-swaps when
//!   [`conditional_writes`](ObjectStore::conditional_writes) is true: of two writers expecting the
//!   same state, at most one succeeds. When it is false the store cannot tell, and the last
//!   writer wins.
//! * A missing object is not an error: reads say so, deleting one succeeds.
//! * `list` visits keys in ascending byte order.
//! * Calls may run concurrently from many threads.

use std::fmt;
use std::time::SystemTime;

use super::{BlockBuf, Capabilities, Fence};
use crate::Result;

/// A small object read whole, with its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// The object's bytes.
    pub bytes: Vec<u8>,
    /// Opaque; changes with every write (an S3 ETag, a counter).
    pub version: String,
}

/// What [`ObjectStore::read_into`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadInto {
    /// No such object; the buffer is untouched.
    Missing,
    /// The buffer holds the bytes asked for.
    Filled,
    /// The object exists but does not have the bytes asked for: it is this many bytes long (a
    /// whole read of an object of another length, a range past its end). The buffer's bytes are
    /// unspecified.
    WrongSize(u64),
}

/// When a [`put`](ObjectStore::put) may replace what is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put<'a> {
    /// Always.
    Always,
    /// Only if there is no object (S3 `If-None-Match: *`).
    IfAbsent,
    /// Only if the object is at this version (S3 `If-Match`).
    IfVersion(&'a str),
}

/// One object found by [`ObjectStore::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The object's key.
    pub key: String,
    /// Its length in bytes.
    pub size: u64,
    /// When it was last written, by the store's clock.
    pub modified: SystemTime,
}

/// A bucket, directory or map of objects.
pub trait ObjectStore: Send + Sync + fmt::Debug + fmt::Display {
    /// Reads the whole object at `key`, refusing one longer than `max_len` bytes (records,
    /// leases and map pages are small; a stray object may be anything).
    ///
    /// # Errors
    /// Store failures, and [`Error::CorruptRecord`](crate::Error::CorruptRecord) naming the key
    /// for an object longer than `max_len`.
    fn get(&self, key: &str, max_len: usize) -> Result<Option<Object>>;

    /// Reads `buf.len()` bytes of the object at `key` into `buf`: the whole object when `offset`
    /// is `None` (it must be exactly that long), or the range starting at `offset` (the object
    /// must reach its end). The store may replace `buf` with a buffer of its own of the same
    /// length.
    ///
    /// # Errors
    /// Store failures.
    fn read_into(&self, key: &str, offset: Option<u64>, buf: &mut BlockBuf) -> Result<ReadInto>;

    /// Writes `data` as the object at `key` if `condition` holds, returning its new version, or
    /// `None` when the condition did not hold. `fence`, if any, is asked right before the request
    /// may go out (after any wait for a request slot), and no attempt of it is sent after the
    /// instant it gives; without one, the store's own timeout bounds the request.
    ///
    /// # Errors
    /// What `fence` says, [`Error::Timeout`](crate::Error::Timeout) for a request its deadline
    /// stopped, and store failures; the object then holds its old or its new bytes.
    fn put(&self, key: &str, data: &[u8], condition: Put<'_>, fence: Option<Fence<'_>>) -> Result<Option<String>>;

    /// Deletes the objects at `keys` (missing ones included), fenced as [`put`](Self::put);
    /// stores with a batch request (S3 DeleteObjects) send few requests for many keys.
    ///
    /// # Errors
    /// As `put`; some of the objects may be deleted then.
    fn delete(&self, keys: &[String], fence: Option<Fence<'_>>) -> Result<()>;

    /// Calls `visit` with every object whose key starts with `prefix` and sorts after
    /// `start_after` (if given), in ascending key order, until `visit` returns `false`.
    ///
    /// # Errors
    /// Store failures.
    fn list(&self, prefix: &str, start_after: Option<&str>, visit: &mut dyn FnMut(Listed) -> bool) -> Result<()>;

    /// Makes every earlier successful `put` and `delete` durable (a directory fsync); a no-op
    /// where they are durable when they return (S3).
    ///
    /// # Errors
    /// Store failures.
    fn sync(&self) -> Result<()>;

    /// Whether [`Put::IfAbsent`] and [`Put::IfVersion`] really are compare-and-swaps here.
    ///
    /// # Errors
    /// Store failures while finding out.
    fn conditional_writes(&self) -> Result<bool>;

    /// Requests sent again after a transient failure; stores that never retry count none.
    fn retries(&self) -> u64 {
        0
    }

    /// What this store is like (see [`Storage::capabilities`](super::Storage::capabilities)),
    /// which the layouts over it report as theirs. The default describes a remote store (S3).
    fn capabilities(&self) -> Capabilities {
        Capabilities::REMOTE
    }
}

/// Whether an object of `size` bytes has the `len` bytes a [`read_into`](ObjectStore::read_into)
/// at `offset` asks for: the whole object must be `len` long, a range must end within it.
pub(crate) fn holds(size: u64, offset: Option<u64>, len: usize) -> bool {
    match offset {
        None => size == len as u64,
        Some(start) => start.checked_add(len as u64).is_some_and(|end| end <= size),
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod dir;
#[cfg(any(test, feature = "testing"))]
pub mod faulty;
pub mod memory;

pub use dir::DirObjects;
pub use memory::MemoryObjects;

//! `FaultyObjects`: a test decorator of an in-memory object store that counts GETs, says what a
//! test wants of its conditional writes, and fails the writes a test chooses.
//!
//! Tests use it to show how many requests an operation costs, how the `cas` layout behaves on a
//! server that ignores conditional writes (Garage), and what an operation interrupted between
//! two writes leaves behind.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Listed, MemoryObjects, Object, ObjectStore, Put, ReadInto};
use crate::storage::{BlockBuf, Fence};
use crate::{lock, Error, Result};

/// A [`MemoryObjects`] that counts GETs and fails chosen writes with [`Error::Backend`].
#[derive(Debug)]
pub struct FaultyObjects {
    inner: MemoryObjects,
    /// What it says of its conditional writes (the memory store's are real either way).
    conditional: bool,
    /// Calls of `get`.
    pub gets: AtomicU64,
    /// Fail every put of a key starting with this.
    pub fail_puts_under: Mutex<Option<String>>,
    /// Fail every delete while set.
    pub fail_deletes: AtomicBool,
}

impl FaultyObjects {
    /// An empty store that claims conditional writes if `conditional`, failing nothing yet.
    pub fn new(conditional: bool) -> Self {
        FaultyObjects {
            inner: MemoryObjects::default(),
            conditional,
            gets: AtomicU64::new(0),
            fail_puts_under: Mutex::new(None),
            fail_deletes: AtomicBool::new(false),
        }
    }

    /// Fails every later put of a key starting with `prefix`, or none with `None`.
    pub fn fail_puts_under(&self, prefix: Option<&str>) {
        *lock(&self.fail_puts_under) = prefix.map(str::to_string);
    }

    fn injected(&self, what: String) -> Error {
        Error::backend(self, format!("injected failure: {what}"))
    }
}

impl fmt::Display for FaultyObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultyObjects")
    }
}

impl ObjectStore for FaultyObjects {
    fn get(&self, key: &str, max_len: usize) -> Result<Option<Object>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key, max_len)
    }

    fn read_into(&self, key: &str, offset: Option<u64>, buf: &mut BlockBuf) -> Result<ReadInto> {
        self.inner.read_into(key, offset, buf)
    }

    fn put(&self, key: &str, data: &[u8], condition: Put<'_>, fence: Option<Fence<'_>>) -> Result<Option<String>> {
        if lock(&self.fail_puts_under).as_deref().is_some_and(|prefix| key.starts_with(prefix)) {
            return Err(self.injected(format!("put {key}")));
        }
        self.inner.put(key, data, condition, fence)
    }

    fn delete(&self, keys: &[String], fence: Option<Fence<'_>>) -> Result<()> {
        if self.fail_deletes.load(Ordering::Relaxed) {
            return Err(self.injected(format!("delete {keys:?}")));
        }
        self.inner.delete(keys, fence)
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, visit: &mut dyn FnMut(Listed) -> bool) -> Result<()> {
        self.inner.list(prefix, start_after, visit)
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn conditional_writes(&self) -> Result<bool> {
        Ok(self.conditional)
    }
}

//! `FaultyObjects`: a test decorator of an in-memory object store that counts the reads and
//! writes reaching it, says what a test wants of its conditional writes, and shows each request
//! to a hook the test sets, which may slow it or fail it.
//!
//! Tests use it to show how many requests an operation costs, how the `cas` layout behaves on a
//! server that ignores conditional writes (Garage), what an operation interrupted between two
//! writes leaves behind, and what a slow store does to an ordering. One decorator for all of
//! them, so that no test carries a pass-through store of its own.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Listed, MemoryObjects, Object, ObjectStore, Put, ReadInto};
use crate::storage::{BlockBuf, Fence};
use crate::{lock, Error, Result};

/// A request as the hook sees it, before it reaches the store.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// `get` of a key.
    Get(&'a str),
    /// `read_into` of a key.
    ReadInto(&'a str),
    /// `put` of a key.
    Put(&'a str),
    /// `delete` of keys.
    Delete(&'a [String]),
}

impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Get(key) => write!(f, "get {key}"),
            Request::ReadInto(key) => write!(f, "read {key}"),
            Request::Put(key) => write!(f, "put {key}"),
            Request::Delete(keys) => write!(f, "delete {keys:?}"),
        }
    }
}

/// What a hook makes of a request: `Err(why)` fails it with [`Error::Backend`] saying why.
type Hook = Arc<dyn Fn(&Request<'_>) -> std::result::Result<(), String> + Send + Sync>;

/// A [`MemoryObjects`] that counts requests and runs a test's hook before each.
pub struct FaultyObjects {
    inner: MemoryObjects,
    /// What it says of its conditional writes (the memory store's are real either way).
    conditional: bool,
    /// Calls of `get` and `read_into`.
    pub reads: AtomicU64,
    /// Calls of `put` and `delete`.
    pub writes: AtomicU64,
    hook: Mutex<Option<Hook>>,
}

impl FaultyObjects {
    /// An empty store that claims conditional writes if `conditional`, with no hook yet.
    pub fn new(conditional: bool) -> Self {
        FaultyObjects {
            inner: MemoryObjects::default(),
            conditional,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            hook: Mutex::new(None),
        }
    }

    /// Shows every later request to `hook` first, in place of any earlier hook.
    pub fn before_each(&self, hook: impl Fn(&Request<'_>) -> std::result::Result<(), String> + Send + Sync + 'static) {
        *lock(&self.hook) = Some(Arc::new(hook));
    }

    /// Lets every later request through untouched.
    pub fn clear_hook(&self) {
        *lock(&self.hook) = None;
    }

    /// Counts `request` and runs the hook on it.
    fn admit(&self, request: Request<'_>) -> Result<()> {
        let counter = match request {
            Request::Get(_) | Request::ReadInto(_) => &self.reads,
            Request::Put(_) | Request::Delete(_) => &self.writes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Run outside the lock: a hook may sleep, and other requests must not wait for it.
        let hook = lock(&self.hook).clone();
        match hook.map(|hook| hook(&request)) {
            Some(Err(why)) => Err(Error::backend(self, format!("{request}: {why} (injected)"))),
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for FaultyObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyObjects").field("conditional", &self.conditional).finish_non_exhaustive()
    }
}

impl fmt::Display for FaultyObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultyObjects")
    }
}

impl ObjectStore for FaultyObjects {
    fn get(&self, key: &str, max_len: usize) -> Result<Option<Object>> {
        self.admit(Request::Get(key))?;
        self.inner.get(key, max_len)
    }

    fn read_into(&self, key: &str, offset: Option<u64>, buf: &mut BlockBuf) -> Result<ReadInto> {
        self.admit(Request::ReadInto(key))?;
        self.inner.read_into(key, offset, buf)
    }

    fn put(&self, key: &str, data: &[u8], condition: Put<'_>, fence: Option<Fence<'_>>) -> Result<Option<String>> {
        self.admit(Request::Put(key))?;
        self.inner.put(key, data, condition, fence)
    }

    fn delete(&self, keys: &[String], fence: Option<Fence<'_>>) -> Result<()> {
        self.admit(Request::Delete(keys))?;
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

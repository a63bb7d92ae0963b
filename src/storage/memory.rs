//! `MemoryBackend`, the exports of `storage=memory`, kept as objects in RAM.

use std::sync::Arc;

use super::{MemoryObjects, ObjectBackend};

/// The exports of one process, in RAM: records, leases and blocks as [`MemoryObjects`], kept
/// like those of any other store (`MemoryBackend::default()`).
pub type MemoryBackend = ObjectBackend;

impl Default for ObjectBackend {
    /// An empty store in RAM.
    fn default() -> Self {
        ObjectBackend::new(Arc::new(MemoryObjects::default()))
    }
}

//! What `nbds3ctl` does to exports, as functions over a [`Backend`]: list, inspect, create and
//! delete them. The binary only parses arguments and prints.

use std::sync::Arc;

use crate::exports::open_geometry;
use crate::lease::{Lease, LeaseConfig, LeaseHolder};
use crate::storage::{Backend, BlockId};
use crate::{Error, ExportName, Geometry, Result};

/// One export as `list` and `info` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export.
    pub name: ExportName,
    /// Its recorded geometry.
    pub geometry: Geometry,
    /// How many blocks storage holds.
    pub stored_blocks: u64,
    /// Who holds its lease; `None` if no writer ever took it.
    pub lease: Option<LeaseHolder>,
}

impl ExportInfo {
    /// Bytes stored: blocks times block size.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_blocks * self.geometry.block_size() as u64
    }
}

/// Every export of `backend`, with its geometry and what it stores.
///
/// # Errors
/// Backend failures, and a malformed record.
pub fn list(backend: &dyn Backend) -> Result<Vec<ExportInfo>> {
    backend.list_exports()?.into_iter().map(|name| info(backend, &name)).collect()
}

/// One export.
///
/// # Errors
/// [`Error::NotFound`] if it has no record; backend failures.
pub fn info(backend: &dyn Backend, name: &ExportName) -> Result<ExportInfo> {
    let record = backend.read_record(name)?.ok_or_else(|| not_found(backend, name))?;
    let geometry = Geometry::from_record(&record)?;
    let stored_blocks = backend.open(name, geometry.block_size())?.list_blocks()?.len() as u64;
    let lease = LeaseHolder::read(backend, name)?;
    Ok(ExportInfo { name: name.clone(), geometry, stored_blocks, lease })
}

/// Creates an export of `size` bytes in `block_size`-byte blocks.
///
/// # Errors
/// [`Error::Config`] if it already exists or the geometry is not allowed; backend failures.
pub fn create(backend: &dyn Backend, name: &ExportName, size: u64, block_size: usize) -> Result<Geometry> {
    if backend.read_record(name)?.is_some() {
        return Err(Error::config("export", format!("export {name} already exists")));
    }
    Geometry::new(size, block_size)?;
    open_geometry(backend, name, Some(size), Some(block_size))
}

/// Deletes an export's blocks in batches, calling `progress(done, total)` after each, then its
/// record and lease; returns how many blocks were deleted. With `lease`, it first takes the
/// export's lease like a writer, so an export that a live nbdkit writes to is never deleted.
///
/// # Errors
/// [`Error::NotFound`] if it has no record; [`Error::Lease`] naming the writer that holds it;
/// backend failures (the record stays, so deleting again finishes the job).
pub fn delete(
    backend: &Arc<dyn Backend>,
    name: &ExportName,
    lease: Option<LeaseConfig>,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64> {
    let export = info(&**backend, name)?;
    let lease = lease.map(|config| Lease::new(backend.clone(), name.clone(), config));
    if let Some(lease) = &lease {
        lease.hold()?;
    }
    let storage = backend.open(name, export.geometry.block_size())?;
    let blocks: Vec<BlockId> = storage.list_blocks()?;
    let total = blocks.len() as u64;
    let mut done = 0;
    progress(0, total);
    for batch in blocks.chunks(1000) {
        storage.delete_blocks(batch)?;
        done += batch.len() as u64;
        progress(done, total);
    }
    storage.flush()?;
    if let Some(lease) = lease {
        lease.release();
    }
    backend.delete_record(name)?;
    Ok(total)
}

fn not_found(backend: &dyn Backend, name: &ExportName) -> Error {
    Error::NotFound { store: backend.to_string(), message: format!("export {name} does not exist") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryBackend;

    #[test]
    fn create_list_info_delete() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let backend = &backend;
        let a = ExportName::new("a").unwrap();
        let b = ExportName::new("b").unwrap();
        create(&**backend, &a, 1 << 20, 4096).unwrap();
        create(&**backend, &b, 2 << 20, 512).unwrap();
        assert!(create(&**backend, &a, 1 << 20, 4096).unwrap_err().to_string().contains("already exists"));
        let storage = backend.open(&a, 4096).unwrap();
        for i in 0..2500 {
            storage.write_block(BlockId(i), &[1; 4096]).unwrap();
        }
        let all = list(&**backend).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].stored_blocks, all[0].stored_bytes()), (2500, 2500 * 4096));
        assert_eq!(all[1].geometry, Geometry::new(2 << 20, 512).unwrap());
        let mut seen = Vec::new();
        let lease = LeaseConfig {
            time: std::time::Duration::from_secs(60),
            takeover: false,
            request_timeout: std::time::Duration::from_secs(30),
        };
        let writer = Lease::new(backend.clone(), a.clone(), lease);
        writer.hold().unwrap();
        let e = delete(backend, &a, Some(lease), |_, _| {}).unwrap_err().to_string();
        assert!(e.starts_with("export a: is held by another writer"), "{e}");
        writer.release();
        assert_eq!(delete(backend, &a, Some(lease), |done, total| seen.push((done, total))).unwrap(), 2500);
        assert_eq!(seen, [(0, 2500), (1000, 2500), (2000, 2500), (2500, 2500)]);
        assert_eq!(backend.read_lease(&a).unwrap(), None, "the lease goes with the export");
        assert!(matches!(info(&**backend, &a), Err(Error::NotFound { .. })));
        assert!(matches!(delete(backend, &a, None, |_, _| {}), Err(Error::NotFound { .. })));
        assert_eq!(list(&**backend).unwrap().len(), 1);
    }
}

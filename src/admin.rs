//! What `nbds3ctl` does to exports, as functions over a [`Backend`]: list, inspect, create,
//! resize and delete them. The binary only parses arguments and prints.

use std::sync::Arc;

use crate::export_record::{ExportRecord, Layout};
use crate::lease::{Lease, LeaseConfig, LeaseHolder};
use crate::storage::cas::format::{head_key, snapshot_key};
use crate::storage::cas::usage::{MapWalk, StoredObjects};
use crate::storage::cas::{ops, CasConfig};
use crate::storage::{Backend, BlockId, Storage};
use crate::{Error, ExportName, Geometry, Result};

/// One export as `list` and `info` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export.
    pub name: ExportName,
    /// Its recorded geometry.
    pub geometry: Geometry,
    /// How its blocks are stored.
    pub layout: Layout,
    /// How many blocks storage holds.
    pub stored_blocks: u64,
    /// Who holds its lease; `None` if no writer ever took it.
    pub lease: Option<LeaseHolder>,
    /// When `lease` was read, in Unix seconds: the moment to judge it at, since a listing of
    /// many exports may take longer than a lease lasts while its holder renews it.
    pub lease_read_at: u64,
}

impl ExportInfo {
    /// Bytes stored: blocks times block size.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_blocks * self.geometry.block_size() as u64
    }

    /// What holes save: the size less the bytes stored (for a cas export, mapped).
    pub fn holes_saved_bytes(&self) -> u64 {
        self.geometry.size().saturating_sub(self.stored_bytes())
    }
}

/// Every export of `backend`, with its geometry and what it stores.
///
/// # Errors
/// Backend failures, and a malformed record.
pub fn list(backend: &dyn Backend) -> Result<Vec<ExportInfo>> {
    backend.list_exports()?.into_iter().map(|name| info(backend, &name)).collect()
}

/// One export. For a `cas` export this reads every page of its map once (no per-block memory).
///
/// # Errors
/// [`Error::ExportNotFound`] if it has no record; backend failures.
pub fn info(backend: &dyn Backend, name: &ExportName) -> Result<ExportInfo> {
    describe(backend, name, &mut MapWalk::blocks_only())
}

/// One export, walking a `cas` export's map with `walk`.
fn describe(backend: &dyn Backend, name: &ExportName, walk: &mut MapWalk) -> Result<ExportInfo> {
    let record = ExportRecord::read(backend, name)?.ok_or_else(|| Error::ExportNotFound {
        store: backend.to_string(),
        export: name.to_string(),
        hint: "`nbds3ctl list` shows the exports there are".into(),
    })?;
    let ExportRecord { geometry, layout } = record;
    let stored_blocks = match layout {
        // The committed map, read without opening a writer, so even on a server without
        // conditional writes.
        Layout::Cas => {
            let objects = backend.objects();
            walk.add(&*objects, &ops::head_root(&*objects, name)?)?
        }
        Layout::Plain => record
            .open_storage(backend, name, CasConfig { allow_unconditional: true, ..CasConfig::default() })?
            .list_blocks()?
            .len() as u64,
    };
    let lease = LeaseHolder::read(backend, name)?;
    let lease_read_at = crate::lease::unix_seconds();
    Ok(ExportInfo { name: name.clone(), geometry, layout, stored_blocks, lease, lease_read_at })
}

/// Where a `cas` export's space goes, as `nbds3ctl info` shows it. "The export" is its live
/// state, as of its last FLUSH, without its snapshots; chunks are exactly one block long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasSpace {
    /// Distinct chunks the export's map references (an identical block anywhere in it is one).
    pub distinct_chunks: u64,
    /// Their bytes.
    pub distinct_chunk_bytes: u64,
    /// What dedup saves within the export: its mapped bytes less its distinct chunks' bytes.
    pub dedup_saved_bytes: u64,
    /// Map pages of the export.
    pub pages: u64,
    /// Their bytes.
    pub page_bytes: u64,
    /// How many snapshots the export has.
    pub snapshots: u64,
    /// Distinct chunks of the export and its snapshots together.
    pub with_snapshots_chunks: u64,
    /// Their bytes.
    pub with_snapshots_chunk_bytes: u64,
    /// Distinct map pages of the export and its snapshots together.
    pub with_snapshots_pages: u64,
    /// Their bytes.
    pub with_snapshots_page_bytes: u64,
    /// Every chunk and page object in the bucket: all cas exports, snapshots and clones share
    /// these, and garbage stays in them until `nbds3ctl gc`.
    pub bucket: StoredObjects,
}

/// One export, and for a `cas` export where its space goes. Costs, for a `cas` export: a GET of
/// its head and of each snapshot record, one GET per distinct page of their maps, a LIST of
/// `cas/chunks/` and `cas/pages/` (a request per 1000 objects in the bucket), and memory for a
/// set of the distinct chunks (see [`MapWalk::with_chunks`]).
///
/// # Errors
/// As [`info`]; pages or records that fail their checks, named.
pub fn space(backend: &dyn Backend, name: &ExportName) -> Result<(ExportInfo, Option<CasSpace>)> {
    let mut walk = MapWalk::with_chunks();
    let export = describe(backend, name, &mut walk)?;
    if export.layout != Layout::Cas {
        return Ok((export, None));
    }
    let (distinct_chunks, pages, page_bytes) = (walk.distinct_chunks(), walk.pages(), walk.page_bytes());
    let objects = backend.objects();
    let mut snapshots = 0;
    for snap in ops::list_snapshots(&*objects, name)? {
        match ops::read_snapshot(&*objects, name, &snap) {
            Ok(record) => walk.add(&*objects, &record.root)?,
            // Deleted since the listing: no longer the export's.
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        snapshots += 1;
    }
    let bs = export.geometry.block_size() as u64;
    let space = CasSpace {
        distinct_chunks,
        distinct_chunk_bytes: distinct_chunks * bs,
        dedup_saved_bytes: export.stored_bytes().saturating_sub(distinct_chunks * bs),
        pages,
        page_bytes,
        snapshots,
        with_snapshots_chunks: walk.distinct_chunks(),
        with_snapshots_chunk_bytes: walk.distinct_chunks() * bs,
        with_snapshots_pages: walk.pages(),
        with_snapshots_page_bytes: walk.page_bytes(),
        bucket: StoredObjects::list(&*objects)?,
    };
    Ok((export, Some(space)))
}

/// Creates an export of `size` bytes in `block_size`-byte blocks, in `layout`.
///
/// # Errors
/// [`Error::Config`] if it already exists or the geometry is not allowed; backend failures.
pub fn create(
    backend: &dyn Backend,
    name: &ExportName,
    size: u64,
    block_size: usize,
    layout: Layout,
) -> Result<Geometry> {
    if backend.read_record(name)?.is_some() {
        return Err(Error::config("export", format!("export {name} already exists")));
    }
    let geometry = Geometry::new(size, block_size)?;
    ExportRecord { geometry, layout }.create(backend, name)?;
    Ok(geometry)
}

/// What [`resize`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    /// The geometry before.
    pub from: Geometry,
    /// The geometry now.
    pub to: Geometry,
    /// Blocks deleted past the new end (only when shrinking).
    pub deleted_blocks: u64,
}

/// Sets an export's size to `size` bytes, a multiple of its block size.
///
/// Growing only rewrites the record, also while nbdkit serves the export: connections opened
/// afterwards see the new size. Shrinking, only with `shrink`, takes the export's lease like a
/// writer (so it is refused while a live nbdkit writes to it), deletes the stored blocks past
/// the new end (calling `progress(done, total)` after each batch), and only then rewrites the
/// record, so an interrupted shrink leaves the export at its old size (with part of what lay past
/// the new end gone), and shrinking again finishes the job.
///
/// # Errors
/// [`Error::ExportNotFound`]; [`Error::Config`] naming `size` when it is not a multiple of the
/// block size, or smaller without `shrink`; [`Error::Lease`] naming the writer that holds the
/// export; backend failures.
pub fn resize(
    backend: &Arc<dyn Backend>,
    name: &ExportName,
    size: u64,
    shrink: bool,
    lease: Option<LeaseConfig>,
    progress: impl FnMut(u64, u64),
) -> Result<Resized> {
    let ExportInfo { geometry: from, layout, .. } = info(&**backend, name)?;
    let record = |geometry| ExportRecord { geometry, layout }.write(&**backend, name);
    let bs = from.block_size() as u64;
    if size % bs != 0 || size == 0 {
        let down = size / bs * bs;
        let nearest = if down == 0 { format!("{bs}") } else { format!("{down} or {}", down + bs) };
        return Err(Error::config(
            "size",
            format!("{size} is not a multiple of export {name}'s block size ({bs} bytes): use {nearest}"),
        ));
    }
    let to = from.with_size(size)?;
    let mut resized = Resized { from, to, deleted_blocks: 0 };
    if to.size() < from.size() {
        if !shrink {
            return Err(Error::config(
                "size",
                format!(
                    "export {name} is {} bytes; shrinking it to {size} deletes everything past {size}: give --shrink to do that",
                    from.size()
                ),
            ));
        }
        resized.deleted_blocks = under_lease(backend, name, lease, |storage, _| {
            let past_end = storage.list_blocks_in(to.blocks()..u64::MAX)?;
            let deleted = delete_in_batches(storage, &past_end, progress)?;
            record(to)?;
            Ok(deleted)
        })?;
    } else if to != from {
        record(to)?;
    }
    Ok(resized)
}

/// Deletes an export's blocks in batches, calling `progress(done, total)` after each, then its
/// record and lease; returns how many blocks were deleted. With `lease`, it first takes the
/// export's lease like a writer, so an export that a live nbdkit writes to is never deleted.
///
/// # Errors
/// [`Error::ExportNotFound`] if it has no record; [`Error::Lease`] naming the writer that holds
/// it; backend failures (the record stays, so deleting again finishes the job).
pub fn delete(
    backend: &Arc<dyn Backend>,
    name: &ExportName,
    lease: Option<LeaseConfig>,
    progress: impl FnMut(u64, u64),
) -> Result<u64> {
    let deleted = under_lease(backend, name, lease, |storage, layout| {
        let deleted = delete_in_batches(storage, &storage.list_blocks()?, progress)?;
        if layout == Layout::Cas {
            // Its chunks and pages stay until `nbds3ctl gc`: clones may share them.
            let objects = backend.objects();
            let snapshots = ops::list_snapshots(&*objects, name)?;
            let mut keys: Vec<String> = snapshots.iter().map(|snap| snapshot_key(name, snap)).collect();
            keys.push(head_key(name));
            objects.delete(&keys, None)?;
        }
        Ok(deleted)
    })?;
    backend.delete_record(name)?;
    Ok(deleted)
}

/// Runs `work` on the storage of existing export `name`, holding its lease (with `lease`) the
/// while, like a writer; returns how many blocks `work` reports deleted.
fn under_lease(
    backend: &Arc<dyn Backend>,
    name: &ExportName,
    lease: Option<LeaseConfig>,
    work: impl FnOnce(&dyn Storage, Layout) -> Result<u64>,
) -> Result<u64> {
    let ExportInfo { geometry, layout, .. } = info(&**backend, name)?;
    let storage = ExportRecord { geometry, layout }.open_storage(&**backend, name, CasConfig::default())?;
    let lease = lease.map(|config| Lease::new(backend.clone(), name.clone(), config));
    if let Some(lease) = &lease {
        lease.hold()?;
    }
    let deleted = work(&*storage, layout);
    if let Some(lease) = lease {
        lease.release();
    }
    deleted
}

/// Deletes `blocks` 1000 at a time (one S3 DeleteObjects each), calling `progress(done, total)`
/// before the first batch and after each, then flushes; returns how many were deleted.
fn delete_in_batches(storage: &dyn Storage, blocks: &[BlockId], mut progress: impl FnMut(u64, u64)) -> Result<u64> {
    let total = blocks.len() as u64;
    let mut done = 0;
    progress(0, total);
    for batch in blocks.chunks(1000) {
        storage.delete_blocks(batch)?;
        done += batch.len() as u64;
        progress(done, total);
    }
    storage.flush()?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryBackend;

    /// A writer holding `name`'s lease, and the lease configuration it and the tests use.
    fn another_writer(backend: &Arc<dyn Backend>, name: &ExportName) -> (LeaseConfig, Arc<Lease>) {
        let config = LeaseConfig {
            time: std::time::Duration::from_secs(60),
            takeover: false,
            request_timeout: std::time::Duration::from_secs(30),
        };
        let writer = Lease::new(backend.clone(), name.clone(), config);
        writer.hold().unwrap();
        (config, writer)
    }

    #[test]
    fn a_cas_export_is_counted_from_its_map_and_deleted_with_its_snapshots() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let (dev, snap) = (ExportName::new("dev").unwrap(), ExportName::new("s1").unwrap());
        let read = |name: &ExportName| {
            let record = ExportRecord::read(&*backend, name).unwrap().unwrap();
            let storage = record.open_storage(&*backend, name, CasConfig::default()).unwrap();
            let mut buf = crate::storage::BlockBuf::zeroed(4096);
            storage.read_block(BlockId(3), &mut buf).unwrap();
            buf[0]
        };
        create(&*backend, &dev, 1 << 20, 4096, Layout::Cas).unwrap();
        let record = ExportRecord::read(&*backend, &dev).unwrap().unwrap();
        let storage = record.open_storage(&*backend, &dev, CasConfig::default()).unwrap();
        for i in 0..5 {
            storage.write_block(BlockId(i), &[7; 4096]).unwrap();
        }
        storage.flush().unwrap();
        drop(storage);
        crate::snapshots::snapshot(&*backend, &*backend.objects(), &dev, &snap).unwrap();
        assert_eq!(info(&*backend, &dev).unwrap().stored_blocks, 5, "blocks in the map, not under blocks/");
        assert_eq!(read(&dev), 7);

        delete(&backend, &dev, None, |_, _| {}).unwrap();
        let left = |prefix: &str| {
            let mut keys = Vec::new();
            backend
                .objects()
                .list(prefix, None, &mut |l| {
                    keys.push(l.key);
                    true
                })
                .unwrap();
            keys
        };
        assert_eq!((left("cas/heads/"), left("cas/snapshots/")), (vec![], vec![]), "head and snapshots deleted");
        create(&*backend, &dev, 1 << 20, 4096, Layout::Cas).unwrap();
        assert_eq!(read(&dev), 0, "a new export of the same name starts empty");

        // A head whose record is gone (a clone or delete interrupted between them) keeps the name
        // from a new export, which would serve the head's blocks, until it is cleared.
        let storage = ExportRecord::read(&*backend, &dev)
            .unwrap()
            .unwrap()
            .open_storage(&*backend, &dev, CasConfig::default())
            .unwrap();
        storage.write_block(BlockId(3), &[9; 4096]).unwrap();
        storage.flush().unwrap();
        drop(storage);
        backend.objects().delete(&[dev.record_key()], None).unwrap();
        for layout in [Layout::Cas, Layout::Plain] {
            let err = create(&*backend, &dev, 1 << 20, 4096, layout).unwrap_err().to_string();
            assert!(err.contains("export dev has no record but a cas head (cas/heads/dev)"), "{err}");
            assert!(err.contains("`nbds3ctl delete dev` frees the name"), "{err}");
        }
        assert!(crate::snapshots::clear_interrupted_clone(&*backend, &*backend.objects(), &dev).unwrap());
        create(&*backend, &dev, 1 << 20, 4096, Layout::Cas).unwrap();
        assert_eq!(read(&dev), 0, "once cleared, a new export starts empty");
    }

    #[test]
    fn create_list_info_delete() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let backend = &backend;
        let a = ExportName::new("a").unwrap();
        let b = ExportName::new("b").unwrap();
        create(&**backend, &a, 1 << 20, 4096, Layout::Plain).unwrap();
        create(&**backend, &b, 2 << 20, 512, Layout::Plain).unwrap();
        assert!(create(&**backend, &a, 1 << 20, 4096, Layout::Plain)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        let storage = backend.open(&a, 4096).unwrap();
        for i in 0..2500 {
            storage.write_block(BlockId(i), &[1; 4096]).unwrap();
        }
        let all = list(&**backend).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].stored_blocks, all[0].stored_bytes()), (2500, 2500 * 4096));
        assert_eq!(all[1].geometry, Geometry::new(2 << 20, 512).unwrap());
        let mut seen = Vec::new();
        let (lease, writer) = another_writer(backend, &a);
        let e = delete(backend, &a, Some(lease), |_, _| {}).unwrap_err().to_string();
        assert!(e.starts_with("export a: is held by another writer"), "{e}");
        writer.release();
        assert_eq!(delete(backend, &a, Some(lease), |done, total| seen.push((done, total))).unwrap(), 2500);
        assert_eq!(seen, [(0, 2500), (1000, 2500), (2000, 2500), (2500, 2500)]);
        assert_eq!(backend.read_lease(&a).unwrap(), None, "the lease goes with the export");
        assert!(matches!(info(&**backend, &a), Err(Error::ExportNotFound { .. })));
        assert!(matches!(delete(backend, &a, None, |_, _| {}), Err(Error::ExportNotFound { .. })));
        assert_eq!(list(&**backend).unwrap().len(), 1);
    }

    #[test]
    fn resize_grows_the_record_only_and_shrinks_only_when_asked() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let a = ExportName::new("a").unwrap();
        create(&*backend, &a, 1 << 20, 4096, Layout::Plain).unwrap();
        let storage = backend.open(&a, 4096).unwrap();
        for i in [0, 100, 255] {
            storage.write_block(BlockId(i), &[1; 4096]).unwrap();
        }
        let geometry = |size| Geometry::new(size, 4096).unwrap();
        let grown = resize(&backend, &a, 4 << 20, false, None, |_, _| panic!("nothing to delete")).unwrap();
        assert_eq!(grown, Resized { from: geometry(1 << 20), to: geometry(4 << 20), deleted_blocks: 0 });
        assert_eq!(storage.list_blocks().unwrap(), [BlockId(0), BlockId(100), BlockId(255)]);
        storage.write_block(BlockId(1000), &[1; 4096]).unwrap();

        let e = resize(&backend, &a, 1 << 19, false, None, |_, _| {}).unwrap_err().to_string();
        assert!(e.ends_with("shrinking it to 524288 deletes everything past 524288: give --shrink to do that"), "{e}");
        let e = resize(&backend, &a, 1_000_000, true, None, |_, _| {}).unwrap_err().to_string();
        assert_eq!(e, "size: 1000000 is not a multiple of export a's block size (4096 bytes): use 999424 or 1003520");
        assert_eq!(info(&*backend, &a).unwrap().geometry, geometry(4 << 20), "refusals change nothing");

        let (lease, writer) = another_writer(&backend, &a);
        let e = resize(&backend, &a, 1 << 19, true, Some(lease), |_, _| {}).unwrap_err().to_string();
        assert!(e.starts_with("export a: is held by another writer"), "{e}");
        assert!(resize(&backend, &a, 8 << 20, false, Some(lease), |_, _| {}).is_ok(), "growing needs no lease");
        writer.release();
        let mut seen = Vec::new();
        let shrunk = resize(&backend, &a, 1 << 19, true, Some(lease), |done, total| seen.push((done, total))).unwrap();
        assert_eq!(shrunk, Resized { from: geometry(8 << 20), to: geometry(1 << 19), deleted_blocks: 2 });
        assert_eq!(seen, [(0, 2), (2, 2)]);
        assert_eq!(storage.list_blocks().unwrap(), [BlockId(0), BlockId(100)]);
        assert_eq!(info(&*backend, &a).unwrap().geometry, geometry(1 << 19));
        let missing = resize(&backend, &ExportName::new("b").unwrap(), 1 << 20, false, None, |_, _| {});
        assert!(matches!(missing, Err(Error::ExportNotFound { .. })), "{missing:?}");
    }
}

//! Snapshots, clones and diffs of `cas` exports, as functions over a [`Backend`] (for export
//! records) and an [`ObjectStore`] (for the layout's heads, snapshot records and pages): what
//! `nbds3ctl snapshot`, `snapshots`, `delete-snapshot`, `clone` and `diff` do.
//!
//! Here live the checks a user's input needs (`EXPORT@SNAP` names, the export's layout, a clone
//! onto an existing name); the layout's own operations are in `storage::cas::ops`.

use std::fmt;

use crate::export_record::{ExportRecord, Layout};
use crate::storage::cas::format::{head_key, snapshot_key, Root, SnapshotRecord};
use crate::storage::cas::ops::{self, Change};
use crate::storage::cas::read_head;
use crate::storage::objects::ObjectStore;
use crate::storage::Backend;
use crate::{Error, ExportName, Geometry, Result};

/// An export, or one of its snapshots: `EXPORT` or `EXPORT@SNAP`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    /// The export.
    pub export: ExportName,
    /// The snapshot, or `None` for the export's last committed state.
    pub snapshot: Option<ExportName>,
}

impl Version {
    /// Parses `EXPORT` or `EXPORT@SNAP`; both names follow the export-name rules.
    ///
    /// # Errors
    /// [`Error::Config`] naming what is wrong with either name.
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once('@') {
            None => Ok(Version { export: ExportName::new(text)?, snapshot: None }),
            Some((export, snap)) => {
                let snapshot =
                    ExportName::new(snap).map_err(|e| Error::config("snapshot", format!("in {text:?}: {e}")))?;
                Ok(Version { export: ExportName::new(export)?, snapshot: Some(snapshot) })
            }
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.snapshot {
            None => write!(f, "{}", self.export),
            Some(snap) => write!(f, "{}@{snap}", self.export),
        }
    }
}

/// The record of `export`, which must exist and have the `cas` layout.
pub(crate) fn cas_record(backend: &dyn Backend, export: &ExportName, what: &str) -> Result<Geometry> {
    let record = ExportRecord::read(backend, export)?.ok_or_else(|| Error::ExportNotFound {
        store: backend.to_string(),
        export: export.to_string(),
        hint: "`nbds3ctl list` shows the exports there are".into(),
    })?;
    match record.layout {
        Layout::Cas => Ok(record.geometry),
        layout => Err(Error::config(
            "export",
            format!(
                "export {export} has layout {layout}, which has no {what}; copy it into a cas export first: `nbds3ctl create NEW --size {} --block-size {} --layout cas`, then `nbdcopy` from {export} to NEW",
                record.geometry.size(),
                record.geometry.block_size()
            ),
        )),
    }
}

/// Takes snapshot `snap` of the `cas` export `export`: its state as of its last completed FLUSH.
///
/// # Errors
/// A missing or `plain` export, an existing snapshot of that name; store failures.
pub fn snapshot(
    backend: &dyn Backend,
    objects: &dyn ObjectStore,
    export: &ExportName,
    snap: &ExportName,
) -> Result<SnapshotRecord> {
    let geometry = cas_record(backend, export, "snapshots")?;
    ops::take_snapshot(objects, export, snap, geometry.size(), geometry.block_size())
}

/// The snapshots of the `cas` export `export`, in order.
///
/// # Errors
/// A missing or `plain` export; store failures.
pub fn snapshots(backend: &dyn Backend, objects: &dyn ObjectStore, export: &ExportName) -> Result<Vec<ExportName>> {
    cas_record(backend, export, "snapshots")?;
    ops::list_snapshots(objects, export)
}

/// Deletes snapshot `snap` of `export`; clones of it keep every block.
///
/// # Errors
/// A missing snapshot; store failures.
pub fn delete_snapshot(objects: &dyn ObjectStore, export: &ExportName, snap: &ExportName) -> Result<()> {
    ops::delete_snapshot(objects, export, snap)
}

/// Creates the writable `cas` export `clone` sharing every block of snapshot `snap` of `export`:
/// its first head, then its export record, which makes it an export. A clone interrupted
/// between the two leaves a head that nothing serves: the same clone run again finishes it,
/// and `nbds3ctl delete` frees the name ([`clear_interrupted_clone`]). A record that could not
/// be written takes the head back with it, so the name is free again.
///
/// # Errors
/// A missing snapshot; an existing export named `clone`, or the head of another interrupted
/// clone there; store failures.
pub fn clone(
    backend: &dyn Backend,
    objects: &dyn ObjectStore,
    export: &ExportName,
    snap: &ExportName,
    clone: &ExportName,
) -> Result<ExportRecord> {
    if ExportRecord::read(backend, clone)?.is_some() {
        return Err(Error::config("clone", format!("export {clone} already exists: clone onto a new name")));
    }
    let record = match read_head(objects, clone)? {
        None => ops::clone_snapshot(objects, export, snap, clone)?,
        Some((head, _)) => {
            let record = ops::read_snapshot(objects, export, snap)?;
            if head.generation != 1 || head.writer != ops::clone_writer(export, snap) || head.root != record.root {
                return Err(Error::config(
                    "clone",
                    format!(
                        "export {clone} has a cas head ({}, written by {}) but no export record, left by an interrupted clone or delete: `nbds3ctl delete {clone}` frees the name",
                        head_key(clone),
                        head.writer
                    ),
                ));
            }
            log::info!("clone {export}@{snap} onto {clone} was interrupted after its head: finishing it");
            record
        }
    };
    let export_record =
        ExportRecord { geometry: Geometry::new(record.device_size, record.block_size)?, layout: Layout::Cas };
    if let Err(e) = export_record.write(backend, clone) {
        // A write whose answer was lost may have landed: only a record known to be missing lets
        // the head go, or the export would read as zeros. Unknown, both stay for a rerun.
        match ExportRecord::read(backend, clone) {
            Ok(Some(found)) if found == export_record => return Ok(export_record),
            Ok(None) => match objects.delete(&[head_key(clone)], None) {
                Ok(()) => return Err(e),
                Err(undo) => log::warn!("clone {clone}: taking its head back failed: {undo}"),
            },
            _ => {}
        }
        log::warn!(
            "clone {clone} is unfinished: run `nbds3ctl clone {export}@{snap} {clone}` again to finish it, or `nbds3ctl delete {clone}` to free the name"
        );
        return Err(e);
    }
    Ok(export_record)
}

/// Frees a name that a clone interrupted before its export record left taken: when `name` has
/// a cas head but no record, deletes the head (and any snapshot records under the name), which
/// no export used. Returns whether it did; an export with a record is left alone.
///
/// # Errors
/// Store failures.
pub fn clear_interrupted_clone(backend: &dyn Backend, objects: &dyn ObjectStore, name: &ExportName) -> Result<bool> {
    if ExportRecord::read(backend, name)?.is_some() || read_head(objects, name)?.is_none() {
        return Ok(false);
    }
    let mut keys: Vec<String> =
        ops::list_snapshots(objects, name)?.iter().map(|snap| snapshot_key(name, snap)).collect();
    keys.push(head_key(name));
    objects.delete(&keys, None)?;
    log::info!("{name}: deleted the head an interrupted clone left ({})", head_key(name));
    Ok(true)
}

/// Bytes of a device that differ between two versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangedBytes {
    /// The first byte.
    pub offset: u64,
    /// How many bytes.
    pub length: u64,
    /// What they hold in the later version.
    pub change: Change,
}

/// The map and geometry of an export or snapshot.
pub(crate) fn version_root(
    backend: &dyn Backend,
    objects: &dyn ObjectStore,
    version: &Version,
) -> Result<(Root, Geometry)> {
    match &version.snapshot {
        None => {
            let geometry = cas_record(backend, &version.export, "diffs")?;
            Ok((ops::head_root(objects, &version.export)?, geometry))
        }
        Some(snap) => {
            let record = ops::read_snapshot(objects, &version.export, snap)?;
            Ok((record.root, Geometry::new(record.device_size, record.block_size)?))
        }
    }
}

/// The byte ranges whose content differs from `from` to `to` (of any lineage, of one block
/// size), within `to`'s size, costing requests in proportion to what changed.
///
/// # Errors
/// Missing exports or snapshots, `plain` exports, different block sizes; store failures.
pub fn diff(
    backend: &dyn Backend,
    objects: &dyn ObjectStore,
    from: &Version,
    to: &Version,
) -> Result<Vec<ChangedBytes>> {
    let (from_root, from_geometry) = version_root(backend, objects, from)?;
    let (to_root, to_geometry) = version_root(backend, objects, to)?;
    let block_size = to_geometry.block_size() as u64;
    if from_geometry.block_size() as u64 != block_size {
        return Err(Error::config(
            "diff",
            format!(
                "{from} has {}-byte blocks and {to} {block_size}-byte blocks: diffs compare blocks of one size",
                from_geometry.block_size()
            ),
        ));
    }
    let end = to_geometry.size();
    Ok(ops::diff(objects, &from_root, &to_root)?
        .into_iter()
        .filter_map(|run| {
            let offset = run.first.checked_mul(block_size)?;
            let length = run.blocks.saturating_mul(block_size).min(end.checked_sub(offset)?);
            (length > 0).then_some(ChangedBytes { offset, length, change: run.change })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::cas::{CasConfig, CasStorage};
    use crate::storage::objects::faulty::{FaultyObjects, Request};
    use crate::storage::objects::MemoryObjects;
    use crate::storage::{BlockBuf, BlockId, MemoryBackend, ObjectBackend, Storage};

    fn name(s: &str) -> ExportName {
        ExportName::new(s).unwrap()
    }

    fn cas_export(backend: &dyn Backend, export: &str, size: u64) {
        ExportRecord { geometry: Geometry::new(size, 4096).unwrap(), layout: Layout::Cas }
            .write(backend, &name(export))
            .unwrap();
    }

    #[test]
    fn versions_parse_with_export_name_rules() {
        assert_eq!(Version::parse("e@s").unwrap().to_string(), "e@s");
        assert_eq!(Version::parse("e").unwrap().snapshot, None);
        assert!(Version::parse("e@")
            .unwrap_err()
            .to_string()
            .starts_with("snapshot: in \"e@\": export: invalid export name"));
        assert!(Version::parse("e@a/b").unwrap_err().to_string().contains("character '/'"));
        assert!(Version::parse("e@s@t").is_err());
        assert!(Version::parse("@s").is_err());
    }

    #[test]
    fn bad_input_is_refused_by_name() {
        let (backend, objects) = (MemoryBackend::default(), MemoryObjects::default());
        let err = snapshot(&backend, &objects, &name("nope"), &name("s")).unwrap_err().to_string();
        assert!(err.contains("export nope does not exist"), "{err}");
        crate::admin::create(&backend, &name("p"), 1 << 20, 4096, Layout::Plain).unwrap();
        let err = snapshot(&backend, &objects, &name("p"), &name("s")).unwrap_err().to_string();
        assert!(err.contains("layout plain, which has no snapshots") && err.contains("--layout cas"), "{err}");
        cas_export(&backend, "c", 1 << 20);
        let err = clone(&backend, &objects, &name("c"), &name("missing"), &name("new")).unwrap_err().to_string();
        assert!(err.contains("export c has no snapshot missing"), "{err}");
        snapshot(&backend, &objects, &name("c"), &name("s")).unwrap();
        let err = clone(&backend, &objects, &name("c"), &name("s"), &name("p")).unwrap_err().to_string();
        assert!(err.contains("export p already exists"), "{err}");
        let err = delete_snapshot(&objects, &name("c"), &name("other")).unwrap_err().to_string();
        assert!(err.contains("no snapshot other"), "{err}");
    }

    /// Block 3 of `export` as last committed.
    fn block_3(objects: &Arc<FaultyObjects>, export: &ExportName) -> Vec<u8> {
        let storage = CasStorage::open(objects.clone(), export, 4096, CasConfig::default()).unwrap();
        let mut buf = BlockBuf::zeroed(4096);
        storage.read_block(BlockId(3), &mut buf).unwrap();
        buf.to_vec()
    }

    /// Clones whose record cannot be written, as after a crash between head and record when
    /// taking the head back fails too: a rerun of the same clone finishes it, a clone of
    /// something else onto the name is refused saying how to free it, and freeing it lets any
    /// clone take the name. A record that fails alone takes its head back.
    #[test]
    fn an_interrupted_clone_is_finished_by_a_rerun_or_its_name_freed() {
        let objects = Arc::new(FaultyObjects::new(true));
        let backend = ObjectBackend::new(objects.clone());
        let (e, a, b, c, d) = (name("e"), name("a"), name("b"), name("c"), name("d"));
        cas_export(&backend, "e", 1 << 20);
        let live = CasStorage::open(objects.clone(), &e, 4096, CasConfig::default()).unwrap();
        for (seed, snap) in [(3, &a), (4, &b)] {
            live.write_block(BlockId(3), &[seed; 4096]).unwrap();
            live.flush().unwrap();
            snapshot(&backend, &*objects, &e, snap).unwrap();
        }
        // The record's PUT fails; with `deletes_fail`, so does taking the head back.
        let interrupted_clone = |snap: &ExportName, new: &ExportName, deletes_fail: bool| {
            objects.before_each(move |request| match request {
                Request::Put(key) if key.starts_with("exports/") => Err("refused".into()),
                Request::Delete(_) if deletes_fail => Err("refused".into()),
                _ => Ok(()),
            });
            let err = clone(&backend, &*objects, &e, snap, new).unwrap_err().to_string();
            objects.clear_hook();
            assert!(err.contains("put exports/") && err.contains("(injected)"), "{err}");
        };

        interrupted_clone(&a, &c, false);
        assert!(read_head(&*objects, &c).unwrap().is_none(), "a record that failed took its head back");
        interrupted_clone(&a, &c, true);
        interrupted_clone(&a, &d, true);
        assert!(read_head(&*objects, &c).unwrap().is_some() && ExportRecord::read(&backend, &c).unwrap().is_none());

        let err = clone(&backend, &*objects, &e, &b, &c).unwrap_err().to_string();
        assert!(
            err.contains("export c has a cas head (cas/heads/c, written by clone of e@a) but no export record")
                && err.contains("`nbds3ctl delete c` frees the name"),
            "{err}"
        );
        assert_eq!(clone(&backend, &*objects, &e, &a, &c).unwrap().layout, Layout::Cas, "a rerun finishes it");
        assert_eq!(block_3(&objects, &c), [3; 4096]);
        assert!(!clear_interrupted_clone(&backend, &*objects, &c).unwrap(), "a finished clone is left alone");
        assert!(!clear_interrupted_clone(&backend, &*objects, &name("never")).unwrap());

        assert!(clear_interrupted_clone(&backend, &*objects, &d).unwrap());
        assert!(read_head(&*objects, &d).unwrap().is_none(), "the name is free");
        clone(&backend, &*objects, &e, &b, &d).unwrap();
        assert_eq!(block_3(&objects, &d), [4; 4096]);
        assert_eq!(block_3(&objects, &c), [3; 4096]);
    }

    #[test]
    fn clone_snapshot_and_diff_in_bytes() {
        let backend = MemoryBackend::default();
        let objects = Arc::new(MemoryObjects::default());
        let size = 10 * 4096; // block 10 lies past the end (as after a shrink): not reported
        cas_export(&backend, "e", size);
        let live = CasStorage::open(objects.clone(), &name("e"), 4096, CasConfig::default()).unwrap();
        live.write_block(BlockId(1), &[1; 4096]).unwrap();
        live.flush().unwrap();
        snapshot(&backend, &*objects, &name("e"), &name("a")).unwrap();
        live.write_block(BlockId(2), &[2; 4096]).unwrap();
        live.write_block(BlockId(10), &[3; 4096]).unwrap();
        live.delete_block(BlockId(1)).unwrap();
        live.flush().unwrap();
        let runs = diff(&backend, &*objects, &Version::parse("e@a").unwrap(), &Version::parse("e").unwrap()).unwrap();
        let bytes = |offset, length, change| ChangedBytes { offset, length, change };
        assert_eq!(runs, vec![bytes(4096, 4096, Change::Zero), bytes(8192, 4096, Change::Data)]);

        let record = clone(&backend, &*objects, &name("e"), &name("a"), &name("c")).unwrap();
        assert_eq!((record.layout, record.geometry.size()), (Layout::Cas, size));
        assert_eq!(snapshots(&backend, &*objects, &name("e")).unwrap(), vec![name("a")]);
        let runs = diff(&backend, &*objects, &Version::parse("c").unwrap(), &Version::parse("e@a").unwrap()).unwrap();
        assert_eq!(runs, vec![], "a clone starts equal to its snapshot");
    }
}

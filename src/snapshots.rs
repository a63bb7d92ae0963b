//! Snapshots, clones and diffs of `cas` exports, as functions over a [`Backend`] (for export
//! records) and an [`ObjectStore`] (for the layout's heads, snapshot records and pages): what
//! `nbds3ctl snapshot`, `snapshots`, `delete-snapshot`, `clone` and `diff` do.
//!
//! Here live the checks a user's input needs (`EXPORT@SNAP` names, the export's layout, a clone
//! onto an existing name); the layout's own operations are in `storage::cas::ops`.

use std::fmt;

use crate::export_record::{ExportRecord, Layout};
use crate::storage::cas::format::{Root, SnapshotRecord};
use crate::storage::cas::ops::{self, Change};
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

/// Creates the writable `cas` export `clone` sharing every block of snapshot `snap` of `export`.
///
/// # Errors
/// A missing snapshot; an existing export named `clone`; store failures.
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
    let record = ops::clone_snapshot(objects, export, snap, clone)?;
    let export_record =
        ExportRecord { geometry: Geometry::new(record.device_size, record.block_size)?, layout: Layout::Cas };
    export_record.write(backend, clone)?;
    Ok(export_record)
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
    use crate::storage::objects::MemoryObjects;
    use crate::storage::{BlockId, MemoryBackend, Storage};

    fn name(s: &str) -> ExportName {
        ExportName::new(s).unwrap()
    }

    fn cas_export(backend: &MemoryBackend, export: &str, size: u64) {
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

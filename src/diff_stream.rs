//! `export-diff` and `import-diff` of `cas` exports, as functions over a [`Backend`] (export
//! records, leases) and an [`ObjectStore`] (the layout's heads, snapshots, pages and chunks):
//! an incremental backup to another export or bucket in two commands.
//!
//! Here live the checks a user's input needs (versions named `EXPORT@SNAP`, the layout, the
//! lease of the export written to); the stream format and its atomic apply are in
//! `storage::cas::stream` (docs/DIFF-STREAM.md).

use std::io::{Read, Write};
use std::sync::Arc;

use crate::lease::{Lease, LeaseConfig};
use crate::snapshots::{cas_record, version_root, Version};
use crate::storage::cas::stream::{self, Side, StreamSummary};
use crate::storage::cas::{CasConfig, CasStorage};
use crate::storage::objects::ObjectStore;
use crate::storage::Backend;
use crate::{Error, ExportName, Result};

/// Writes the diff stream from `from` (`None`: the empty device, so the stream carries every
/// block of `to`) to `to` into `out`, calling `progress(done, total)` in blocks. The two may be
/// of different exports, of one block size; `to` may be a live export (its last committed state).
///
/// # Errors
/// Missing exports or snapshots, `plain` exports, different block sizes; store failures, pages or
/// chunks that fail their checks; write errors of `out`.
pub fn export_diff(
    backend: &dyn Backend,
    objects: Arc<dyn ObjectStore>,
    from: Option<&Version>,
    to: &Version,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StreamSummary> {
    let (to_reader, to_geometry) = match &to.snapshot {
        None => {
            let geometry = cas_record(backend, &to.export, "diffs")?;
            // Only read: a second writer cannot be harmed, so conditional writes are not needed.
            let config = CasConfig { allow_unconditional: true, ..CasConfig::default() };
            (CasStorage::open(objects.clone(), &to.export, geometry.block_size(), config)?, geometry)
        }
        Some(snap) => {
            let (_, geometry) = version_root(backend, &*objects, to)?;
            (CasStorage::open_snapshot(objects.clone(), &to.export, snap, geometry.block_size())?, geometry)
        }
    };
    let from = match from {
        None => Side::empty(),
        Some(version) => {
            let (root, geometry) = version_root(backend, &*objects, version)?;
            if geometry.block_size() != to_geometry.block_size() {
                return Err(Error::config(
                    "export-diff",
                    format!(
                        "{version} has {}-byte blocks and {to} {}-byte blocks: diffs compare blocks of one size",
                        geometry.block_size(),
                        to_geometry.block_size()
                    ),
                ));
            }
            Side { name: version.to_string(), root }
        }
    };
    let to_side = Side { name: to.to_string(), root: to_reader.committed_root() };
    stream::write_stream(&*objects, from, to_side, to_geometry.size(), &to_reader, out, progress)
}

/// How [`import_diff`] writes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImportOptions {
    /// Apply the stream whatever state the export holds.
    pub force: bool,
    /// Hold the export's lease like a writer; `None` with leases off.
    pub lease: Option<LeaseConfig>,
    /// How the export is opened (`allow_unconditional` for a store without conditional writes).
    pub cas: CasConfig,
}

/// Applies the diff stream read from `input` to the `cas` export `export`, holding its lease
/// (with `options.lease`) like a writer, and commits it with one FLUSH once the whole stream has
/// checked out; until then the export reads as before, and any refusal leaves it so. Unless
/// `options.force`, the export must hold the stream's `from` state. Calls `progress(done, total)`
/// in blocks.
///
/// # Errors
/// A missing or `plain` export; [`Error::Lease`] naming the writer that holds it; a stream that is
/// not one, of a newer version, truncated, altered, of another block size, larger than the
/// export, or made from another state; store failures.
pub fn import_diff(
    backend: &Arc<dyn Backend>,
    objects: Arc<dyn ObjectStore>,
    export: &ExportName,
    input: &mut dyn Read,
    options: ImportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StreamSummary> {
    let geometry = cas_record(&**backend, export, "diff imports")?;
    let lease = options.lease.map(|config| Lease::new(backend.clone(), export.clone(), config));
    if let Some(lease) = &lease {
        lease.hold()?;
    }
    let applied = stream::apply_to_export(
        objects,
        export,
        (geometry.size(), geometry.block_size()),
        options.cas,
        input,
        options.force,
        progress,
    );
    if let Some(lease) = lease {
        lease.release();
    }
    applied
}

//! `Exports`: the open volumes of one nbdkit process, one per export name, shared by connections;
//! and the rules for opening or creating an export from its geometry record.
//!
//! Sharing one [`Volume`] per export is what makes FLUSH and FUA on one connection cover writes
//! made on another, so `can_multi_conn` can be true.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::config::{Config, StorageKind};
use crate::export::ExportName;
use crate::lease::Lease;
use crate::stats_file::{self, StatsFormat};
use crate::storage::{Backend, FencedStorage, FileBackend, MemoryBackend, S3Backend};
use crate::volume::{Geometry, Volume, DEFAULT_BLOCK_SIZE};
use crate::{lock, Error, Result};

/// Opens the backend `config` names. For S3 this builds the client on the process-wide runtime,
/// so call it after nbdkit forks.
///
/// # Errors
/// [`Error::Config`] for a missing directory, or the runtime failing to start.
pub fn open_backend(config: &Config) -> Result<Arc<dyn Backend>> {
    Ok(match config.storage_kind() {
        StorageKind::Memory => Arc::new(MemoryBackend::default()),
        StorageKind::File => {
            let dir = config.dir.as_deref().ok_or_else(|| Error::config("dir", "storage=file needs dir=PATH"))?;
            Arc::new(FileBackend::new(dir)?)
        }
        StorageKind::S3 => Arc::new(S3Backend::new(&config.s3)?),
    })
}

/// The geometry of `export`: its record if it has one (which `size` and `block_size`, when
/// given, must match), otherwise a new record of `size` and `block_size`, written now.
///
/// # Errors
/// [`Error::Config`] naming `size` or `block-size` when they contradict the record, and
/// [`Error::NotFound`] for a new export with no `size`.
pub fn open_geometry(
    backend: &dyn Backend,
    export: &ExportName,
    size: Option<u64>,
    block_size: Option<usize>,
) -> Result<Geometry> {
    if let Some(record) = backend.read_record(export)? {
        let recorded = Geometry::from_record(&record)?;
        if let Some(bs) = block_size.filter(|&bs| bs != recorded.block_size()) {
            return Err(contradiction(
                export,
                "block-size",
                recorded.block_size() as u64,
                bs as u64,
                "would misread its blocks",
            ));
        }
        if let Some(size) = size.filter(|&s| s != recorded.size()) {
            return Err(contradiction(export, "size", recorded.size(), size, "contradicts it"));
        }
        return Ok(recorded);
    }
    let size = size.ok_or_else(|| Error::NotFound {
        store: backend.to_string(),
        message: format!("export {export} does not exist; give size= to create it"),
    })?;
    let geometry = Geometry::new(size, block_size.unwrap_or(DEFAULT_BLOCK_SIZE))?;
    backend.write_record(export, &geometry.to_record())?;
    log::info!("export {export}: created, {size} bytes in {}-byte blocks", geometry.block_size());
    Ok(geometry)
}

/// A parameter `key` that disagrees with the value `recorded` when `export` was created.
fn contradiction(export: &ExportName, key: &str, recorded: u64, given: u64, why: &str) -> Error {
    Error::config(
        key,
        format!(
            "export {export} was created with {key}={recorded}; {key}={given} {why} (omit {key}= or give {recorded})"
        ),
    )
}

/// One open export: its volume, and the lease its writers need.
#[derive(Clone, Debug)]
pub struct OpenExport {
    /// The export's blocks, cached, shared by its connections.
    pub volume: Arc<Volume>,
    /// The export's lease; `None` when leases are off (RAM, `lease-time=0`).
    pub lease: Option<Arc<Lease>>,
}

impl OpenExport {
    /// Whether this process may write the export now.
    ///
    /// # Errors
    /// [`Error::Lease`] when it does not hold the lease (any more).
    pub fn check_writable(&self) -> Result<()> {
        self.lease.as_ref().map_or(Ok(()), |l| l.check())
    }
}

/// The volumes of this process, opened on first use.
#[derive(Debug)]
pub struct Exports {
    config: Config,
    /// The backend, opened on first use (after nbdkit forks).
    backend: OnceLock<Arc<dyn Backend>>,
    /// Open exports by name, each opened once under its own lock; kept until the process exits
    /// so their caches outlive connections. `None` while opening, or after opening failed.
    volumes: Mutex<HashMap<ExportName, Arc<Mutex<Option<OpenExport>>>>>,
    /// Set once the stats-file writer has been started (with the first export).
    stats_writer: OnceLock<()>,
}

impl Exports {
    /// The exports of a finished `config`.
    pub fn new(config: Config) -> Self {
        Exports { config, backend: OnceLock::new(), volumes: Mutex::new(HashMap::new()), stats_writer: OnceLock::new() }
    }

    /// The export a client asked for (`""` means the configured default), with its lease held
    /// unless the client is `readonly`.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid name or a contradicted geometry, [`Error::Lease`] when
    /// another writer holds the export, and any error opening its storage.
    pub fn open(&self, requested: &str, readonly: bool) -> Result<OpenExport> {
        let name = if requested.is_empty() { self.config.export.clone() } else { ExportName::new(requested)? };
        let export = self.open_export(name)?;
        if let Some(lease) = export.lease.as_ref().filter(|_| !readonly) {
            lease.hold()?;
        }
        Ok(export)
    }

    fn open_export(&self, name: ExportName) -> Result<OpenExport> {
        // The map is locked only to find the export's slot: opening one export (which lists its
        // blocks in S3) must not hold up connections to the others.
        let slot = lock(&self.volumes).entry(name.clone()).or_default().clone();
        let mut slot = lock(&slot);
        if let Some(open) = &*slot {
            return Ok(open.clone());
        }
        let backend = match self.backend.get() {
            Some(b) => b.clone(),
            None => {
                let b = open_backend(&self.config)?;
                self.backend.get_or_init(|| b).clone()
            }
        };
        let geometry = open_geometry(&*backend, &name, self.config.size, self.config.block_size)?;
        let mut storage = backend.open(&name, geometry.block_size())?;
        log::info!("export {name}: {} bytes in {}-byte blocks on {storage}", geometry.size(), geometry.block_size());
        let lease = self.config.lease_config().map(|c| Lease::new(backend.clone(), name.clone(), c));
        if let Some(lease) = &lease {
            storage = Arc::new(FencedStorage::new(storage, lease.clone()));
        }
        let volume = Arc::new(Volume::new(storage, geometry, self.config.volume_config())?);
        volume.start_background_writer();
        self.stats_writer.get_or_init(|| self.start_stats_writer());
        let open = OpenExport { volume, lease };
        *slot = Some(open.clone());
        Ok(open)
    }

    /// The stats file: every open export's counters, in `format`.
    pub fn stats(&self, format: StatsFormat) -> String {
        let mut counters: Vec<_> =
            self.snapshot().into_iter().map(|(name, open)| (name, open.volume.counters())).collect();
        stats_file::render(format, &mut counters)
    }

    /// With `stats-file=`, rewrites that file every `stats-interval` (atomically, by rename).
    fn start_stats_writer(&self) {
        let Some(path) = self.config.stats_file.clone() else { return };
        let (interval, format) = (self.config.stats_interval, self.config.stats_format);
        let spawned = std::thread::Builder::new().name("nbds3-stats".into()).spawn(move || loop {
            std::thread::sleep(interval);
            let Some(exports) = crate::plugin::exports() else { return };
            let tmp = path.with_extension("tmp");
            if let Err(e) = std::fs::write(&tmp, exports.stats(format)).and_then(|()| std::fs::rename(&tmp, &path)) {
                log::warn!("stats-file {}: {e}", path.display());
            }
        });
        if let Err(e) = spawned {
            log::warn!("cannot start the stats writer: {e}");
        }
    }

    fn snapshot(&self) -> Vec<(ExportName, OpenExport)> {
        let slots: Vec<_> = lock(&self.volumes).iter().map(|(n, slot)| (n.clone(), slot.clone())).collect();
        // An export still opening has nothing to count or write back yet: skip it, don't wait.
        slots.into_iter().filter_map(|(name, slot)| slot.try_lock().ok()?.clone().map(|open| (name, open))).collect()
    }

    /// Writes back every volume's dirty blocks, logs its counters and releases its lease (at
    /// unload).
    pub fn flush_all(&self) {
        for (name, open) in self.snapshot() {
            if let Err(e) = open.volume.flush() {
                log::error!("export {name}: writing back at shutdown failed, unflushed writes are lost: {e}");
            }
            log::info!("export {name}: {}", stats_file::fields(&open.volume.counters()));
            if let Some(lease) = open.lease {
                lease.release();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_export_records_its_geometry_and_later_opens_must_agree() {
        let backend = MemoryBackend::default();
        let dev = ExportName::new("dev").unwrap();
        let e = open_geometry(&backend, &dev, None, None).unwrap_err();
        assert!(e.to_string().contains("export dev does not exist; give size= to create it"), "{e}");
        let g = open_geometry(&backend, &dev, Some(1 << 20), Some(512)).unwrap();
        assert_eq!((g.size(), g.block_size()), (1 << 20, 512));
        assert_eq!(open_geometry(&backend, &dev, None, None).unwrap(), g);
        assert_eq!(open_geometry(&backend, &dev, Some(1 << 20), Some(512)).unwrap(), g);
        let e = open_geometry(&backend, &dev, None, Some(4096)).unwrap_err().to_string();
        assert!(e.starts_with("block-size: export dev was created with block-size=512"), "{e}");
        let e = open_geometry(&backend, &dev, Some(2 << 20), None).unwrap_err().to_string();
        assert!(e.starts_with("size: export dev was created with size=1048576"), "{e}");
        assert_eq!(backend.list_exports().unwrap(), vec![dev]);
    }
}

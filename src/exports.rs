//! `Exports`: the open volumes of one nbdkit process, one per export name, shared by connections;
//! and the rules for opening or creating an export from its geometry record.
//!
//! Sharing one [`Volume`] per export is what makes FLUSH and FUA on one connection cover writes
//! made on another, so `can_multi_conn` can be true.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::config::{Config, CreatePolicy, StorageKind};
use crate::export_name::ExportName;
use crate::export_record::{ExportRecord, Layout};
use crate::lease::Lease;
use crate::snapshots::{self, Version};
use crate::stats_file::{self, StatsFormat};
use crate::storage::cas::{self, CasStorage};
use crate::storage::{s3, Backend, DirObjects, FencedStorage, MemoryBackend, ObjectBackend};
use crate::volume::{Geometry, Volume, DEFAULT_BLOCK_SIZE};
use crate::{background, lock, Error, Result};

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
            Arc::new(ObjectBackend::new(Arc::new(DirObjects::new(dir)?)))
        }
        StorageKind::S3 => Arc::new(s3::backend(&config.s3)?),
    })
}

/// The record `export` opens with: its own if it has one (whose block size `block-size=`,
/// when given, must match; `size=` and `layout=` only shape new exports), otherwise a new record
/// of `size=`, `block-size=` and `layout=`, written now if `config`'s create policy lets this
/// open create it.
///
/// # Errors
/// [`Error::Config`] naming `block-size` when it contradicts the record, and
/// [`Error::ExportNotFound`] for a new export this open may not create or has no `size=` for.
pub fn open_record(backend: &dyn Backend, export: &ExportName, config: &Config) -> Result<ExportRecord> {
    if let Some(record) = ExportRecord::read(backend, export)? {
        let recorded = record.geometry;
        if let Some(bs) = config.block_size.filter(|&bs| bs != recorded.block_size()) {
            return Err(Error::config(
                "block-size",
                format!(
                    "export {export} was created with block-size={}; block-size={bs} would misread its blocks (omit block-size= or give {})",
                    recorded.block_size(),
                    recorded.block_size()
                ),
            ));
        }
        if let Some(size) = config.size.filter(|&s| s != recorded.size()) {
            log::warn!("export {export} is {} bytes; size={size} only sizes new exports", recorded.size());
        }
        if let Some(layout) = config.layout.filter(|&l| l != record.layout) {
            log::warn!("export {export} has layout {}; layout={layout} only lays out new exports", record.layout);
        }
        return Ok(record);
    }
    let create_hint = format!("create it with `nbds3ctl create {export} --size SIZE`");
    let may_create = match config.create {
        CreatePolicy::AnyExport => Ok(()),
        CreatePolicy::DefaultExport if *export == config.export => Ok(()),
        CreatePolicy::DefaultExport => Err(format!(
            "only export={} is created on first open; {create_hint}, or start nbdkit with create=any",
            config.export
        )),
        CreatePolicy::NoExport => Err(format!("nbdkit runs with create=none; {create_hint}")),
    };
    let size = may_create.and_then(|()| config.size.ok_or(format!("give size= to create it, or {create_hint}")));
    let size =
        size.map_err(|hint| Error::ExportNotFound { store: backend.to_string(), export: export.to_string(), hint })?;
    let geometry = Geometry::new(size, config.block_size.unwrap_or(DEFAULT_BLOCK_SIZE))?;
    let record = ExportRecord { geometry, layout: config.layout.unwrap_or_default() };
    record.create(backend, export)?;
    log::info!(
        "export {export}: created, {size} bytes in {}-byte blocks, layout {}",
        geometry.block_size(),
        record.layout
    );
    Ok(record)
}

/// Snapshot `snap` of `export`, for read-only connections: no lease (nothing is written), no
/// write-back.
///
/// # Errors
/// [`Error::ExportNotFound`] naming `EXPORT@SNAP` when the snapshot (or its export) is missing;
/// store failures.
fn open_snapshot(backend: &dyn Backend, export: &ExportName, snap: &ExportName, config: &Config) -> Result<OpenExport> {
    let version = Version { export: export.clone(), snapshot: Some(snap.clone()) };
    let objects = backend.objects();
    let missing = |e: Error| match e {
        Error::NotFound { message, .. } => {
            Error::ExportNotFound { store: backend.to_string(), export: version.to_string(), hint: message }
        }
        e => e,
    };
    let (_, geometry) = snapshots::version_root(backend, &*objects, &version).map_err(missing)?;
    let storage = CasStorage::open_snapshot(objects, export, snap, geometry.block_size()).map_err(missing)?;
    log::info!(
        "snapshot {version}: {} bytes in {}-byte blocks on {storage}, read-only",
        geometry.size(),
        geometry.block_size()
    );
    let volume = Arc::new(Volume::new(Arc::new(storage), geometry, config.volume_config())?);
    Ok(OpenExport { volume, lease: None, read_only: true, write_refusal: None })
}

/// Brings the volume of open export `name` up to its record, read again (one GET) for every new
/// connection: a record grown by `nbds3ctl resize` grows the volume, so the new connection sees
/// the new size. A record that cannot be read (S3 away) leaves the size as it is: the volume's
/// dirty data and cache still serve the connection, as they serve those already open.
///
/// # Errors
/// [`Error::ExportNotFound`] when the record was deleted, [`Error::Config`] naming `export` when
/// it shrank or changed block size (a volume does not shrink under its connections: nbdkit must
/// be restarted to serve it so); the storage's error listing the range it grew into.
fn follow_record(backend: &dyn Backend, name: &ExportName, volume: &Volume) -> Result<()> {
    let open = volume.geometry();
    let recorded = match ExportRecord::read(backend, name) {
        Ok(recorded) => recorded.map(|r| r.geometry),
        Err(e) => {
            log::warn!("export {name}: serving {} bytes, as its record could not be read again: {e}", open.size());
            return Ok(());
        }
    };
    let recorded = recorded.ok_or_else(|| Error::ExportNotFound {
        store: backend.to_string(),
        export: name.to_string(),
        hint: "it was deleted while this nbdkit served it".into(),
    })?;
    if recorded.block_size() != open.block_size() || recorded.size() < open.size() {
        return Err(Error::config(
            "export",
            format!(
                "export {name} is now {} bytes in {}-byte blocks, but this nbdkit serves it as {} bytes in {}-byte blocks; restart nbdkit to serve it as it is now",
                recorded.size(),
                recorded.block_size(),
                open.size(),
                open.block_size()
            ),
        ));
    }
    if recorded.size() > open.size() {
        volume.grow(recorded.size())?;
        log::info!("export {name}: grown from {} to {} bytes", open.size(), recorded.size());
    }
    Ok(())
}

/// One open export: its volume, and the lease its writers need.
#[derive(Clone, Debug)]
pub struct OpenExport {
    /// The export's blocks, cached, shared by its connections.
    pub volume: Arc<Volume>,
    /// The export's lease; `None` when leases are off (RAM, `lease-time=0`) or for a snapshot.
    pub lease: Option<Arc<Lease>>,
    /// A snapshot, which no connection may write.
    pub read_only: bool,
    /// Why no connection may open it for writing (a cas export on a store without conditional
    /// writes, without `cas-unconditional=true`); read-only connections may.
    pub write_refusal: Option<String>,
}

impl OpenExport {
    /// Whether this process may write the export now.
    ///
    /// # Errors
    /// [`Error::Config`] naming `layout` for an export no connection may write;
    /// [`Error::Lease`] when it does not hold the lease (any more).
    pub fn check_writable(&self) -> Result<()> {
        self.check_layout_writable()?;
        self.lease.as_ref().map_or(Ok(()), |l| l.check())
    }

    fn check_layout_writable(&self) -> Result<()> {
        self.write_refusal.as_ref().map_or(Ok(()), |why| Err(Error::config("layout", why.clone())))
    }
}

/// Open exports by name, each behind the lock it is opened under.
type Slots = Mutex<HashMap<Version, Arc<Mutex<Option<OpenExport>>>>>;

/// The volumes of this process, opened on first use.
#[derive(Debug)]
pub struct Exports {
    config: Config,
    /// The backend, opened on first use (after nbdkit forks).
    backend: OnceLock<Arc<dyn Backend>>,
    /// Open exports by name, each opened once under its own lock; kept until the process exits
    /// so their caches outlive connections. `None` while opening, or after opening failed.
    /// Shared with the stats-file writer's thread, which outlives any borrow of `self`.
    volumes: Arc<Slots>,
    /// Set once the stats-file writer has been started (with the first export).
    stats_writer: OnceLock<()>,
}

impl Exports {
    /// The exports of a finished `config`.
    pub fn new(config: Config) -> Self {
        Exports {
            config,
            backend: OnceLock::new(),
            volumes: Arc::new(Mutex::new(HashMap::new())),
            stats_writer: OnceLock::new(),
        }
    }

    /// The export a client asked for (`""` means the configured default; `EXPORT@SNAP` a
    /// snapshot, read-only), with its lease held unless the client is `readonly`. An export already open is brought up to its record
    /// first (its record read again and a grown size followed), so a connection opened after `nbds3ctl resize` sees the
    /// new size.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid name or a contradicted geometry, and naming `layout` for
    /// a writable open of a cas export on a store without conditional writes (unless
    /// `cas-unconditional=true`); [`Error::ExportNotFound`] for an export this open may not
    /// create, [`Error::Lease`] when another writer holds the export, and any error opening its
    /// storage.
    pub fn open(&self, requested: &str, readonly: bool) -> Result<OpenExport> {
        let version = if requested.is_empty() {
            Version { export: self.config.export.clone(), snapshot: None }
        } else {
            Version::parse(requested)?
        };
        let export = self.open_export(version)?;
        if !readonly {
            export.check_layout_writable()?;
            if let Some(lease) = &export.lease {
                lease.hold()?;
            }
        }
        Ok(export)
    }

    fn open_export(&self, version: Version) -> Result<OpenExport> {
        // The map is locked only to find the export's slot: opening one export (which lists its
        // blocks in S3) must not hold up connections to the others.
        let slot = lock(&self.volumes).entry(version.clone()).or_default().clone();
        let mut slot = lock(&slot);
        let backend = match self.backend.get() {
            Some(b) => b.clone(),
            None => {
                let b = open_backend(&self.config)?;
                self.backend.get_or_init(|| b).clone()
            }
        };
        let name = &version.export;
        if let Some(open) = &*slot {
            if version.snapshot.is_none() {
                follow_record(&*backend, name, &open.volume)?;
            }
            return Ok(open.clone());
        }
        let open = match &version.snapshot {
            Some(snap) => open_snapshot(&*backend, name, snap, &self.config)?,
            None => self.open_live(&backend, name)?,
        };
        self.stats_writer.get_or_init(|| self.start_stats_writer());
        *slot = Some(open.clone());
        Ok(open)
    }

    fn open_live(&self, backend: &Arc<dyn Backend>, name: &ExportName) -> Result<OpenExport> {
        let record = open_record(&**backend, name, &self.config)?;
        let geometry = record.geometry;
        // Reading a cas export needs no conditional writes: where the store lacks them, the
        // storage opens all the same, for read-only connections only (see `Exports::open`).
        let write_refusal = match record.layout {
            Layout::Cas if !self.config.cas_unconditional => cas::unfenced_writes(&*backend.objects(), name)?,
            _ => None,
        };
        let unconditional = self.config.cas_unconditional || write_refusal.is_some();
        let mut storage = record.open_storage(&**backend, name, self.config.cas_config(unconditional))?;
        log::info!("export {name}: {} bytes in {}-byte blocks on {storage}", geometry.size(), geometry.block_size());
        let lease = self.config.lease_config().map(|c| Lease::new(backend.clone(), name.clone(), c));
        if let Some(lease) = &lease {
            storage = Arc::new(FencedStorage::new(storage, lease.clone()));
        }
        let volume = Arc::new(Volume::new(storage, geometry, self.config.volume_config())?);
        volume.start_background_writer();
        Ok(OpenExport { volume, lease, read_only: false, write_refusal })
    }

    /// The stats file: every open export's counters, in `format`.
    pub fn stats(&self, format: StatsFormat) -> String {
        stats(&self.volumes, format)
    }

    /// With `stats-file=`, rewrites that file every `stats-interval`.
    fn start_stats_writer(&self) {
        let Some(path) = self.config.stats_file.clone() else { return };
        let (interval, format) = (self.config.stats_interval, self.config.stats_format);
        let volumes = self.volumes.clone();
        write_stats_every(path, interval, move || stats(&volumes, format));
    }

    fn snapshot(&self) -> Vec<(Version, OpenExport)> {
        snapshot(&self.volumes)
    }

    /// Writes back every volume's dirty blocks, logs its counters and releases its lease (at
    /// unload).
    pub fn flush_all(&self) {
        for (name, open) in self.snapshot() {
            if open.read_only {
                continue;
            }
            // A process without the lease (never taken, lost, or not renewed in time) may not
            // write; with nothing dirty it has nothing to say either.
            if open.volume.cache().dirty_blocks() > 0 || open.check_writable().is_ok() {
                if let Err(e) = open.volume.flush() {
                    match open.volume.cache().dirty_blocks() {
                        0 => log::warn!("export {name}: the final flush failed, writes since the last FLUSH may not be durable: {e}"),
                        lost => log::error!(
                            "export {name}: writing back at shutdown failed, {lost} blocks of unflushed writes are lost: {e}"
                        ),
                    }
                }
            }
            log::info!("export {name}: {}", stats_file::fields(&open.volume.counters()));
            if let Some(lease) = open.lease {
                lease.release();
            }
        }
    }
}

/// Rewrites the file at `path` with what `render` says every `interval` (atomically, by rename),
/// on a thread of its own. A panic there stops the stats file, with an error in the log, and
/// nothing else: the counters are for watching the exports, no data depends on them, and failing
/// the exports' writes for a fault in their monitoring would turn it into an outage.
fn write_stats_every(path: PathBuf, interval: Duration, render: impl Fn() -> String + Send + 'static) {
    let shown = path.display().to_string();
    let writer = move || loop {
        std::thread::sleep(interval);
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, render()).and_then(|()| std::fs::rename(&tmp, &path)) {
            log::warn!("stats-file {}: {e}", path.display());
        }
    };
    let on_panic = move |what| log::error!("stats-file {shown}: {what}; the file is no longer updated");
    if let Err(e) = background::spawn("nbds3-stats", writer, on_panic) {
        log::warn!("cannot start the stats writer: {e}");
    }
}

/// The exports and snapshots open in `volumes`.
fn snapshot(volumes: &Slots) -> Vec<(Version, OpenExport)> {
    let slots: Vec<_> = lock(volumes).iter().map(|(n, slot)| (n.clone(), slot.clone())).collect();
    // An export still opening has nothing to count or write back yet: skip it, don't wait.
    slots.into_iter().filter_map(|(name, slot)| slot.try_lock().ok()?.clone().map(|open| (name, open))).collect()
}

/// The stats file of the exports open in `volumes`, in `format`.
fn stats(volumes: &Slots, format: StatsFormat) -> String {
    // Snapshots are left out: they only read, and the stats file names exports.
    let mut counters: Vec<_> = snapshot(volumes)
        .into_iter()
        .filter(|(version, _)| version.snapshot.is_none())
        .map(|(version, open)| (version.export, open.volume.counters()))
        .collect();
    stats_file::render(format, &mut counters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::objects::faulty::FaultyObjects;
    use crate::storage::{BlockId, ObjectStore};

    fn config(pairs: &[(&str, &str)]) -> Config {
        let mut c = Config::default();
        for (k, v) in [("storage", "memory"), ("size", "1M")].iter().chain(pairs) {
            c.set(k, v).unwrap();
        }
        c.finish().unwrap();
        c
    }

    /// A panic in the stats thread (injected through what it renders) stops the stats file, says
    /// so once at error level, and stops nothing else.
    #[test]
    fn a_panic_in_the_stats_thread_stops_the_stats_file_and_says_so() {
        crate::background::captured_log::start();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats");
        let renders = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = renders.clone();
        write_stats_every(path.clone(), Duration::from_millis(10), move || {
            if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2 {
                panic!("injected panic in the stats test");
            }
            "export=dev\n".into()
        });
        let died = "thread nbds3-stats panicked: injected panic in the stats test";
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while crate::background::captured_log::lines_with(died).is_empty() {
            assert!(std::time::Instant::now() < deadline, "nothing logged");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            crate::background::captured_log::lines_with(died),
            [format!("ERROR stats-file {}: {died}; the file is no longer updated", path.display())]
        );
        assert_eq!(renders.load(std::sync::atomic::Ordering::SeqCst), 3, "the writer stopped");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "export=dev\n");
    }

    #[test]
    fn a_new_export_records_its_geometry_and_later_opens_keep_it() {
        let backend = MemoryBackend::default();
        let dev = ExportName::new("dev").unwrap();
        let mut no_size = config(&[]);
        no_size.size = None;
        let e = open_record(&backend, &dev, &no_size).unwrap_err();
        assert!(e.to_string().contains("export dev does not exist; give size= to create it, or create it with `nbds3ctl create dev --size SIZE`"), "{e}");
        let g = open_record(&backend, &dev, &config(&[("block-size", "512")])).unwrap();
        assert_eq!(g.layout, Layout::Plain);
        let g = g.geometry;
        assert_eq!((g.size(), g.block_size()), (1 << 20, 512));
        assert_eq!(open_record(&backend, &dev, &no_size).unwrap().geometry, g);
        assert_eq!(
            open_record(&backend, &dev, &config(&[("size", "2M")])).unwrap().geometry,
            g,
            "size= is for new exports"
        );
        let e = open_record(&backend, &dev, &config(&[("block-size", "4096")])).unwrap_err().to_string();
        assert!(e.starts_with("block-size: export dev was created with block-size=512"), "{e}");
        assert_eq!(backend.list_exports().unwrap(), vec![dev]);
    }

    #[test]
    fn only_the_create_policy_s_exports_are_created_on_first_open() {
        let backend = MemoryBackend::default();
        let typo = ExportName::new("vm1-typo").unwrap();
        let e = open_record(&backend, &typo, &config(&[("export", "vm1")])).unwrap_err();
        assert!(matches!(e, Error::ExportNotFound { .. }), "{e:?}");
        assert!(e.to_string().ends_with("export vm1-typo does not exist; only export=vm1 is created on first open; create it with `nbds3ctl create vm1-typo --size SIZE`, or start nbdkit with create=any"), "{e}");
        let vm1 = ExportName::new("vm1").unwrap();
        let e = open_record(&backend, &vm1, &config(&[("export", "vm1"), ("create", "none")])).unwrap_err();
        assert!(e.to_string().ends_with("export vm1 does not exist; nbdkit runs with create=none; create it with `nbds3ctl create vm1 --size SIZE`"), "{e}");
        assert_eq!(backend.list_exports().unwrap(), vec![], "nothing created");
        open_record(&backend, &vm1, &config(&[("export", "vm1")])).unwrap();
        open_record(&backend, &typo, &config(&[("export", "vm1"), ("create", "any")])).unwrap();
        assert_eq!(backend.list_exports().unwrap(), vec![vm1.clone(), typo]);
        assert!(open_record(&backend, &vm1, &config(&[("create", "none")])).is_ok(), "existing exports open");
    }

    /// `layout=cas` creates a cas export, served through the same volume; `EXPORT@SNAP` serves
    /// its snapshot read-only and without a lease; a missing snapshot is a missing export.
    #[test]
    fn a_cas_export_is_served_and_its_snapshots_read_only() {
        let exports = Exports::new(config(&[("layout", "cas")]));
        let dev = exports.open("", false).unwrap();
        dev.volume.write(b"first", 0, false).unwrap();
        dev.volume.flush().unwrap();
        let backend = exports.backend.get().unwrap().clone();
        let name = ExportName::new("dev").unwrap();
        assert_eq!(ExportRecord::read(&*backend, &name).unwrap().unwrap().layout, Layout::Cas);
        let s1 = ExportName::new("s1").unwrap();
        snapshots::snapshot(&*backend, &*backend.objects(), &name, &s1).unwrap();
        dev.volume.write(b"later", 0, false).unwrap();
        dev.volume.flush().unwrap();
        let snap = exports.open("dev@s1", false).unwrap();
        assert!(snap.read_only && snap.lease.is_none());
        let mut buf = [0u8; 5];
        snap.volume.read(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"first");
        dev.volume.read(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"later");
        let plain = config(&[("layout", "plain")]);
        assert_eq!(open_record(&*backend, &name, &plain).unwrap().layout, Layout::Cas, "the record's layout wins");
        let e = exports.open("dev@nope", true).unwrap_err();
        assert!(matches!(e, Error::ExportNotFound { .. }), "{e:?}");
        assert!(e.to_string().contains("export dev@nope does not exist; export dev has no snapshot nope"), "{e}");
    }

    /// On a store that ignores conditional writes (Garage), a cas export opens for read-only
    /// connections without `cas-unconditional=true` and reads what was written; a writable open
    /// is refused, before or after a read-only one, saying why and what to do.
    #[test]
    fn a_cas_export_without_conditional_writes_opens_read_only_only() {
        let objects = Arc::new(FaultyObjects::new(false));
        let backend: Arc<dyn Backend> = Arc::new(ObjectBackend::new(objects.clone()));
        let opted_in = Exports::new(config(&[("layout", "cas"), ("cas-unconditional", "true")]));
        opted_in.backend.set(backend.clone()).unwrap();
        let writer = opted_in.open("", false).unwrap();
        writer.volume.write(b"kept", 0, false).unwrap();
        writer.volume.flush().unwrap();

        let exports = Exports::new(config(&[("layout", "cas")]));
        exports.backend.set(backend).unwrap();
        let refused = |exports: &Exports| {
            let e = exports.open("", false).unwrap_err().to_string();
            assert!(
                e.starts_with("layout: FaultyObjects does not honour conditional writes")
                    && e.contains("open it read-only (nbdkit -r)")
                    && e.contains("cas-unconditional=true"),
                "{e}"
            );
        };
        refused(&exports);
        let reader = exports.open("", true).unwrap();
        let mut buf = [0u8; 4];
        reader.volume.read(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"kept");
        assert!(reader.check_writable().is_err(), "nothing may write it");
        let head = || objects.get("cas/heads/dev", 4096).unwrap().map(|o| o.bytes);
        let before = head();
        reader.volume.flush().unwrap();
        assert!(before.is_some() && head() == before, "a FLUSH of a read-only connection commits nothing");
        refused(&exports);
    }

    #[test]
    fn an_open_export_follows_its_grown_record_on_the_next_open() {
        let exports = Exports::new(config(&[("block-size", "4096")]));
        let first = exports.open("", false).unwrap();
        first.volume.write(b"kept", (1 << 20) - 4, false).unwrap();
        let backend = exports.backend.get().unwrap().clone();
        let dev = ExportName::new("dev").unwrap();
        ExportRecord::plain(Geometry::new(3 << 20, 4096).unwrap()).write(&*backend, &dev).unwrap();
        // Blocks past the old end that storage holds (left by an interrupted shrink) are seen.
        backend.open(&dev, 4096).unwrap().write_block(BlockId(600), &[7; 4096]).unwrap();
        let second = exports.open("", false).unwrap();
        assert!(Arc::ptr_eq(&first.volume, &second.volume), "one volume per export");
        assert_eq!(second.volume.geometry().size(), 3 << 20);
        let mut buf = [0u8; 4];
        second.volume.read(&mut buf, (1 << 20) - 4).unwrap();
        assert_eq!(&buf, b"kept");
        second.volume.read(&mut buf, 600 * 4096).unwrap();
        assert_eq!(buf, [7; 4]);
        second.volume.write(b"new", (3 << 20) - 3, false).unwrap();

        ExportRecord::plain(Geometry::new(2 << 20, 4096).unwrap()).write(&*backend, &dev).unwrap();
        let e = exports.open("", true).unwrap_err().to_string();
        assert!(
            e.contains(
                "export dev is now 2097152 bytes in 4096-byte blocks, but this nbdkit serves it as 3145728 bytes"
            ),
            "{e}"
        );
        backend.delete_record(&dev).unwrap();
        let e = exports.open("", true).unwrap_err().to_string();
        assert!(e.ends_with("export dev does not exist; it was deleted while this nbdkit served it"), "{e}");
    }
}

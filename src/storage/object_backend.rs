//! `ObjectBackend`: the exports of one [`ObjectStore`]: each export's record, its lease and its
//! blocks (in the [`plain`](super::plain) layout), all as objects, so that a store need only keep
//! objects to serve exports, and the record and lease formats have one reader and writer.
//!
//! A lease is replaced by a conditional put on the version read, which is a compare-and-swap
//! where the store's [`conditional_writes`](ObjectStore::conditional_writes) are; every lease
//! text carries a fresh token and expiry, so its version changes with every write even where a
//! version is a hash of the bytes (an S3 ETag).

use std::fmt;
use std::sync::Arc;

use super::keys::RECORD_PREFIX;
use super::objects::{Listed, ObjectStore, Put};
use super::{Backend, Expect, PlainStorage, Storage, VersionedText};
use crate::export_name::ExportName;
use crate::{Error, Result};

/// The most bytes of a record or lease read: both are a few short lines.
const MAX_TEXT: usize = 64 * 1024;

/// Makes the store one export's blocks go to.
type PerExport = Box<dyn Fn() -> Arc<dyn ObjectStore> + Send + Sync>;

/// The exports kept in one object store.
pub struct ObjectBackend {
    /// Records and leases.
    objects: Arc<dyn ObjectStore>,
    /// Each opened export's blocks, and the stores [`Backend::objects`] hands out.
    per_export: PerExport,
}

impl ObjectBackend {
    /// The exports in `objects`, blocks included.
    pub fn new(objects: Arc<dyn ObjectStore>) -> Self {
        let shared = Arc::clone(&objects);
        ObjectBackend { objects, per_export: Box::new(move || Arc::clone(&shared)) }
    }

    /// The same, with each export's blocks (and each store [`Backend::objects`] hands out) in a
    /// store `per_export` makes: S3 gives each its own request slots.
    pub fn with_stores_per_export(self, per_export: impl Fn() -> Arc<dyn ObjectStore> + Send + Sync + 'static) -> Self {
        ObjectBackend { per_export: Box::new(per_export), ..self }
    }

    /// The text at `key` and its version, or `None` if there is no such object.
    fn read_text(&self, key: &str) -> Result<Option<VersionedText>> {
        let object = match self.objects.get(key, MAX_TEXT) {
            Ok(object) => object,
            // Records and leases are a few lines; an object of any size may be there instead.
            Err(Error::CorruptRecord { store, key, message }) => {
                let message = format!("{message}, so not a record or lease of nbds3");
                return Err(Error::CorruptRecord { store, key, message });
            }
            Err(e) => return Err(e),
        };
        let Some(object) = object else { return Ok(None) };
        let text = String::from_utf8(object.bytes).map_err(|_| Error::CorruptRecord {
            store: self.objects.to_string(),
            key: key.to_string(),
            message: "not UTF-8 text, so not a record or lease of nbds3".into(),
        })?;
        Ok(Some(VersionedText { text, version: object.version }))
    }
}

impl fmt::Debug for ObjectBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBackend").field("objects", &self.objects).finish_non_exhaustive()
    }
}

impl fmt::Display for ObjectBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.objects.fmt(f)
    }
}

impl Backend for ObjectBackend {
    fn open(&self, export: &ExportName, block_size: usize) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(PlainStorage::new((self.per_export)(), export, block_size)))
    }

    fn read_record(&self, export: &ExportName) -> Result<Option<String>> {
        Ok(self.read_text(&export.record_key())?.map(|v| v.text))
    }

    fn write_record(&self, export: &ExportName, record: &str) -> Result<()> {
        self.objects.put(&export.record_key(), record.as_bytes(), Put::Always, None)?;
        self.objects.sync()
    }

    fn delete_record(&self, export: &ExportName) -> Result<()> {
        self.objects.delete(&[export.record_key(), export.lease_key()], None)?;
        self.objects.sync()
    }

    fn list_exports(&self) -> Result<Vec<ExportName>> {
        let mut names = Vec::new();
        self.objects.list(RECORD_PREFIX, None, &mut |listed: Listed| {
            names.extend(listed.key.strip_prefix(RECORD_PREFIX).and_then(|n| ExportName::new(n).ok()));
            true
        })?;
        Ok(names)
    }

    fn read_lease(&self, export: &ExportName) -> Result<Option<VersionedText>> {
        self.read_text(&export.lease_key())
    }

    fn replace_lease(&self, export: &ExportName, expected: Expect<'_>, text: &str) -> Result<Option<String>> {
        let condition = match expected {
            Expect::Absent => Put::IfAbsent,
            Expect::Version(v) => Put::IfVersion(v),
        };
        let replaced = self.objects.put(&export.lease_key(), text.as_bytes(), condition, None)?;
        self.objects.sync()?;
        Ok(replaced)
    }

    fn atomic_leases(&self) -> Result<bool> {
        self.objects.conditional_writes()
    }

    fn objects(&self) -> Arc<dyn ObjectStore> {
        (self.per_export)()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{conformance, DirObjects, MemoryObjects};

    #[test]
    fn conformance_in_memory() {
        let objects: Arc<dyn ObjectStore> = Arc::new(MemoryObjects::default());
        let place = |n: u32| ExportName::new(&format!("place{n}")).unwrap();
        conformance::run_all(
            &|n| Box::new(PlainStorage::new(Arc::clone(&objects), &place(n), conformance::BLOCK_SIZE)),
            false,
        );
        let backend = ObjectBackend::new(objects);
        conformance::backend_records(&backend, "");
        conformance::backend_leases(&backend, "");
    }

    #[test]
    fn conformance_in_a_directory() {
        let root = tempfile::tempdir().unwrap();
        let objects = || Arc::new(DirObjects::new(root.path()).unwrap());
        let backend = || ObjectBackend::new(objects());
        conformance::run_all(
            // A new store each time, as a new process would open the directory.
            &|n| {
                Box::new(PlainStorage::new(
                    objects(),
                    &ExportName::new(&format!("place{n}")).unwrap(),
                    conformance::BLOCK_SIZE,
                ))
            },
            true,
        );
        conformance::backend_records(&backend(), "");
        conformance::backend_leases(&backend(), "");
    }

    /// Directories written by earlier versions keep working: their paths are the keys, and their
    /// temporary files are not blocks.
    #[test]
    fn a_directory_of_an_earlier_version_is_read_as_it_was_written() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("blocks/dev")).unwrap();
        std::fs::create_dir_all(root.path().join("exports")).unwrap();
        std::fs::write(root.path().join("exports/dev"), "size=16384\nblock-size=4096\n").unwrap();
        std::fs::write(root.path().join("exports/tmp~dev"), "size=1").unwrap();
        std::fs::write(root.path().join("blocks/dev/0000000000002000"), [7; 4096]).unwrap();
        std::fs::write(root.path().join("blocks/dev/.0000000000001000.tmp"), b"x").unwrap();
        std::fs::write(root.path().join("blocks/dev/README"), b"x").unwrap();
        let backend = ObjectBackend::new(Arc::new(DirObjects::new(root.path()).unwrap()));
        let dev = ExportName::new("dev").unwrap();
        assert_eq!(backend.list_exports().unwrap(), std::slice::from_ref(&dev));
        assert_eq!(backend.read_record(&dev).unwrap().as_deref(), Some("size=16384\nblock-size=4096\n"));
        let blocks = backend.open(&dev, 4096).unwrap();
        assert_eq!(blocks.list_blocks().unwrap(), [crate::BlockId(2)]);
        let mut buf = crate::storage::BlockBuf::zeroed(4096);
        assert!(blocks.read_block(crate::BlockId(2), &mut buf).unwrap());
        assert_eq!(&buf[..], &[7; 4096][..]);
    }
}

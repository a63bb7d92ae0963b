//! `FileStorage`: one file per stored block in a local directory, laid out like the S3 keys.
//!
//! Block `n` of export `dev` lives at `{dir}/blocks/dev/{n * block_size:016x}`, the same name as
//! its S3 key, so a directory can be synced to a bucket and back. A write goes to a temporary file
//! that is fsynced and then renamed over the block, so a crash leaves the old or the new block,
//! never a torn one; `flush` fsyncs the directory, which makes the renames and deletes durable.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use std::os::fd::AsRawFd;

use super::keys::{block_leaf, parse_block_leaf, LEASE_PREFIX, RECORD_PREFIX};
use super::{check_len, Backend, BlockBuf, BlockId, Capabilities, Expect, Storage, VersionedText};
use crate::export::ExportName;
use crate::{Error, Result};

/// The exports of one directory: records in `{dir}/exports/`, leases in `{dir}/leases/`, blocks
/// in `{dir}/blocks/`.
#[derive(Debug)]
pub struct FileBackend {
    root: PathBuf,
}

impl FileBackend {
    /// The exports under `root`, which must be an existing directory.
    ///
    /// # Errors
    /// [`Error::Config`] naming `dir` if `root` is not a directory.
    pub fn new(root: &Path) -> Result<Self> {
        match fs::metadata(root) {
            Ok(m) if m.is_dir() => Ok(FileBackend { root: root.to_path_buf() }),
            Ok(_) => Err(Error::config("dir", format!("{} is not a directory", root.display()))),
            Err(e) => Err(Error::config("dir", format!("{}: {e}", root.display()))),
        }
    }

    /// The text at `key` (a path under the root), or `None` if there is no such file.
    fn read_text(&self, key: &str) -> Result<Option<String>> {
        let path = self.root.join(key);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(self, path.display(), &e)),
        }
    }

    /// Replaces the text at `key` durably: a crash leaves the old or the new text.
    fn write_text(&self, key: &str, text: &str) -> Result<()> {
        let path = self.root.join(key);
        let (dir, leaf) = key.rsplit_once('/').unwrap_or(("", key));
        let dir = self.root.join(dir);
        // "~" never appears in an export name, so a leftover temporary file is never listed.
        let tmp = dir.join(format!("tmp~{leaf}"));
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(&dir)?;
            let mut file = File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&dir)?.sync_all()
        };
        write().map_err(|e| Error::io(self, path.display(), &e))
    }

    /// Runs `f` holding an exclusive `flock` on `{dir}/leases/lock~`, which serialises lease
    /// changes between processes on this machine.
    fn with_lease_lock<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let dir = self.root.join(LEASE_PREFIX);
        let path = dir.join("lock~");
        let file = fs::create_dir_all(&dir)
            .and_then(|()| OpenOptions::new().create(true).truncate(false).write(true).open(&path))
            .map_err(|e| Error::io(self, path.display(), &e))?;
        // SAFETY: flock on a descriptor we own; the lock goes with the descriptor when `file` drops.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(self, path.display(), &std::io::Error::last_os_error()));
        }
        f()
    }
}

impl fmt::Display for FileBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileBackend({})", self.root.display())
    }
}

impl Backend for FileBackend {
    fn open(&self, export: &ExportName, block_size: usize) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(&self.root, export, block_size)?))
    }

    fn read_record(&self, export: &ExportName) -> Result<Option<String>> {
        self.read_text(&export.record_key())
    }

    fn write_record(&self, export: &ExportName, record: &str) -> Result<()> {
        self.write_text(&export.record_key(), record)
    }

    fn delete_record(&self, export: &ExportName) -> Result<()> {
        for key in [export.record_key(), export.lease_key()] {
            let path = self.root.join(key);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(Error::io(self, path.display(), &e)),
                _ => {}
            }
        }
        // The export's block directory is empty by now; leaving it would be harmless.
        let _ = fs::remove_dir(self.root.join(export.block_prefix()));
        Ok(())
    }

    fn read_lease(&self, export: &ExportName) -> Result<Option<VersionedText>> {
        // The text is its own version: every lease text carries a fresh token and expiry.
        Ok(self.read_text(&export.lease_key())?.map(|text| VersionedText { version: text.clone(), text }))
    }

    fn replace_lease(&self, export: &ExportName, expected: Expect<'_>, text: &str) -> Result<Option<String>> {
        self.with_lease_lock(|| {
            let current = self.read_text(&export.lease_key())?;
            let as_expected = match expected {
                Expect::Absent => current.is_none(),
                Expect::Version(v) => current.as_deref() == Some(v),
            };
            if !as_expected {
                return Ok(None);
            }
            self.write_text(&export.lease_key(), text)?;
            Ok(Some(text.to_string()))
        })
    }

    fn atomic_leases(&self) -> Result<bool> {
        Ok(true)
    }

    fn list_exports(&self) -> Result<Vec<ExportName>> {
        let dir = self.root.join(RECORD_PREFIX);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(self, dir.display(), &e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(self, dir.display(), &e))?;
            if let Some(name) = entry.file_name().to_str().and_then(|n| ExportName::new(n).ok()) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Blocks of one export as files under `{dir}/blocks/{export}/`.
#[derive(Debug)]
pub struct FileStorage {
    /// `{dir}/blocks/{export}`.
    dir: PathBuf,
    block_size: usize,
}

impl FileStorage {
    /// Opens (creating it if needed) the directory of `export` under `root`.
    ///
    /// # Errors
    /// [`Error::NotFound`] if `root` does not exist, and any error creating the export directory.
    pub fn open(root: &Path, export: &ExportName, block_size: usize) -> Result<Self> {
        let store = format!("FileStorage({})", root.display());
        match fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::config("dir", format!("{} is not a directory", root.display()))),
            Err(e) => return Err(Error::io(store, format!("dir {}", root.display()), &e)),
        }
        let dir = root.join(export.block_prefix());
        fs::create_dir_all(&dir).map_err(|e| Error::io(&store, dir.display(), &e))?;
        Ok(FileStorage { dir, block_size })
    }

    fn path(&self, id: BlockId) -> PathBuf {
        self.dir.join(block_leaf(id, self.block_size))
    }

    fn err(&self, path: &Path, e: &std::io::Error) -> Error {
        Error::io(self, path.display(), e)
    }
}

impl fmt::Display for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileStorage({})", self.dir.display())
    }
}

impl Storage for FileStorage {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool> {
        check_len(self, self.block_size, buf.len())?;
        let path = self.path(id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                buf.fill(0);
                return Ok(false);
            }
            Err(e) => return Err(self.err(&path, &e)),
        };
        let len = file.metadata().map_err(|e| self.err(&path, &e))?.len();
        if len != self.block_size as u64 {
            return Err(Error::CorruptBlock {
                store: self.to_string(),
                block: id.0,
                message: format!("{} is {len} bytes, expected {}", path.display(), self.block_size),
            });
        }
        file.read_exact(buf).map_err(|e| self.err(&path, &e))?;
        Ok(true)
    }

    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()> {
        check_len(self, self.block_size, data.len())?;
        let path = self.path(id);
        // Callers never write one block twice at once, so one temporary name per block suffices;
        // it does not parse as a block, so a crash leaves only an ignored stray.
        let tmp = self.dir.join(format!(".{}.tmp", block_leaf(id, self.block_size)));
        let mut file =
            OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(|e| self.err(&tmp, &e))?;
        file.write_all(data).map_err(|e| self.err(&tmp, &e))?;
        file.sync_data().map_err(|e| self.err(&tmp, &e))?;
        fs::rename(&tmp, &path).map_err(|e| self.err(&path, &e))
    }

    fn delete_block(&self, id: BlockId) -> Result<()> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(self.err(&path, &e)),
            _ => Ok(()),
        }
    }

    fn list_blocks(&self) -> Result<Vec<BlockId>> {
        let entries = fs::read_dir(&self.dir).map_err(|e| self.err(&self.dir, &e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.err(&self.dir, &e))?;
            if let Some(id) = entry.file_name().to_str().and_then(|n| parse_block_leaf(n, self.block_size)) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn flush(&self) -> Result<()> {
        // Block files were fsynced before their rename; the directory holds the renames and deletes.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| self.err(&self.dir, &e))
    }

    /// A block read may wait on a disk and every write waits on an fsync: worth overlapping. A
    /// directory is listed in one call.
    fn capabilities(&self) -> Capabilities {
        Capabilities { slow_requests: true, sliced_listing: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;

    #[test]
    fn conformance() {
        let root = tempfile::tempdir().unwrap();
        conformance::run_all(
            &|place| {
                let export = ExportName::new(&format!("place{place}")).unwrap();
                Box::new(FileStorage::open(root.path(), &export, conformance::BLOCK_SIZE).unwrap())
            },
            true,
        );
        conformance::backend_records(&FileBackend::new(root.path()).unwrap(), "");
        conformance::backend_leases(&FileBackend::new(root.path()).unwrap(), "");
    }

    #[test]
    fn a_block_file_of_the_wrong_size_is_corrupt_not_a_panic() {
        let root = tempfile::tempdir().unwrap();
        let export = ExportName::new("dev").unwrap();
        let s = FileStorage::open(root.path(), &export, 4096).unwrap();
        fs::write(root.path().join("blocks/dev/0000000000002000"), b"short").unwrap();
        let e = s.read_block(BlockId(2), &mut BlockBuf::zeroed(4096)).unwrap_err();
        assert!(matches!(e, Error::CorruptBlock { block: 2, .. }), "{e}");
        assert!(e.to_string().contains("is 5 bytes, expected 4096"), "{e}");
    }

    #[test]
    fn stray_files_are_not_blocks() {
        let root = tempfile::tempdir().unwrap();
        let export = ExportName::new("dev").unwrap();
        let s = FileStorage::open(root.path(), &export, 4096).unwrap();
        fs::write(root.path().join("blocks/dev/.0000000000001000.tmp"), b"x").unwrap();
        fs::write(root.path().join("blocks/dev/README"), b"x").unwrap();
        assert!(s.list_blocks().unwrap().is_empty());
    }

    #[test]
    fn a_missing_root_directory_is_named() {
        let e = FileStorage::open(Path::new("/nonexistent/nbds3"), &ExportName::new("dev").unwrap(), 4096).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/nbds3"), "{e}");
    }
}

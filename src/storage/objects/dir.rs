//! `DirObjects`: objects as files under a directory, each at its key as a path
//! (`{dir}/blocks/dev/0000000000001000`), so a directory can be synced to a bucket and back, and
//! directories written by earlier nbds3 versions (the same paths) keep working.
//!
//! A put writes a temporary file beside the object, fsyncs it and renames it over the object, so
//! a crash leaves the old or the new bytes, never a mix; [`sync`](ObjectStore::sync) fsyncs the
//! directories that renames and deletes changed since the last one. Temporary files and the lock
//! file have a `~` in their names, which no key built by nbds3 has; listings skip them.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{DefaultHasher, Hasher};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use super::{Listed, Object, ObjectStore, Put, ReadInto};
use crate::storage::{BlockBuf, Capabilities, Fence};
use crate::{lock, Error, Result};

/// The file whose `flock` serialises conditional puts between processes on this machine: where
/// earlier nbds3 versions locked their leases, so that they and this one exclude each other.
const LOCK: &str = "leases/lock~";

/// Objects under one directory.
#[derive(Debug)]
pub struct DirObjects {
    root: PathBuf,
    /// `FileStorage(dir)`, for messages.
    name: String,
    /// Makes the names of temporary files unique, so that puts of one key may race.
    temporaries: AtomicU64,
    /// Directories whose entries changed (renames, deletes, new directories) since the last sync.
    unsynced: Mutex<HashSet<PathBuf>>,
    /// Held through a whole sync: one that finds nothing left to sync must still wait for the
    /// fsyncs of a concurrent one (another connection's FLUSH) that took its directories.
    syncing: Mutex<()>,
}

impl DirObjects {
    /// The objects under `root`, which must be an existing directory.
    ///
    /// # Errors
    /// [`Error::Config`] naming `dir` if `root` is not a directory.
    pub fn new(root: &Path) -> Result<Self> {
        match fs::metadata(root) {
            Ok(m) if m.is_dir() => Ok(DirObjects {
                root: root.to_path_buf(),
                name: format!("FileStorage({})", root.display()),
                temporaries: AtomicU64::new(0),
                unsynced: Mutex::new(HashSet::new()),
                syncing: Mutex::new(()),
            }),
            Ok(_) => Err(Error::config("dir", format!("{} is not a directory", root.display()))),
            Err(e) => Err(Error::config("dir", format!("{}: {e}", root.display()))),
        }
    }

    /// The path of `key`, refusing keys outside the contract (one that climbed out of the root).
    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.split('/').any(|c| c.is_empty() || c == "." || c == ".." || c.contains('~')) {
            return Err(Error::backend(self, format!("{key:?} is not a valid object key")));
        }
        Ok(self.root.join(key))
    }

    fn err(&self, path: &Path, e: &std::io::Error) -> Error {
        Error::io(self, path.display(), e)
    }

    /// The version of an object with these bytes: a hash of them, as an S3 ETag is (see the
    /// object layer's contract); versions are only compared within one process.
    fn version(bytes: &[u8]) -> String {
        let mut hasher = DefaultHasher::new();
        hasher.write(bytes);
        format!("{:016x}-{}", hasher.finish(), bytes.len())
    }

    /// The bytes at `path`, or `None` if there is no such file.
    fn read(&self, path: &Path, max_len: usize, key: &str) -> Result<Option<Vec<u8>>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(path, &e)),
        };
        let mut bytes = Vec::new();
        // One byte more than allowed tells a file that is too long without reading all of it.
        file.take(max_len as u64 + 1).read_to_end(&mut bytes).map_err(|e| self.err(path, &e))?;
        if bytes.len() > max_len {
            let message = format!("{}: more than {max_len} bytes", path.display());
            return Err(Error::CorruptRecord { store: self.name.clone(), key: key.to_string(), message });
        }
        Ok(Some(bytes))
    }

    /// Replaces the file at `path` with `data` through a fsynced temporary file.
    fn write(&self, path: &Path, data: &[u8]) -> Result<()> {
        let dir = path.parent().unwrap_or(&self.root);
        let leaf = path.file_name().and_then(|l| l.to_str()).unwrap_or_default();
        let tmp = dir.join(format!("{leaf}~{}-{}", std::process::id(), self.temporaries.fetch_add(1, Relaxed)));
        let create = || OpenOptions::new().write(true).create_new(true).open(&tmp);
        let mut file = match create() {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.create_dirs(dir)?;
                create()
            }
            opened => opened,
        }
        .map_err(|e| self.err(&tmp, &e))?;
        let written = file.write_all(data).and_then(|()| file.sync_data()).and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(self.err(path, &e));
        }
        lock(&self.unsynced).insert(dir.to_path_buf());
        Ok(())
    }

    /// Creates `dir` and its missing parents, each to be synced into its parent.
    fn create_dirs(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(|e| self.err(dir, &e))?;
        let mut unsynced = lock(&self.unsynced);
        for ancestor in dir.ancestors().skip(1) {
            unsynced.insert(ancestor.to_path_buf());
            if ancestor == self.root {
                break;
            }
        }
        Ok(())
    }

    /// Runs `f` holding an exclusive `flock` on [`LOCK`].
    fn locked<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let path = self.root.join(LOCK);
        let open = || OpenOptions::new().create(true).truncate(false).write(true).open(&path);
        let file = match open() {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.create_dirs(path.parent().unwrap_or(&self.root))?;
                open()
            }
            opened => opened,
        }
        .map_err(|e| self.err(&path, &e))?;
        // SAFETY: flock on a descriptor we own; the lock goes with the descriptor when `file` drops.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.err(&path, &std::io::Error::last_os_error()));
        }
        f()
    }

    /// Every file under `dir` (a path relative to the root, ending in `/` or empty), as keys.
    fn walk(&self, dir: &str, keys: &mut BTreeSet<String>) -> Result<()> {
        let path = self.root.join(dir);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => return Ok(()),
            Err(e) => return Err(self.err(&path, &e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| self.err(&path, &e))?;
            let Some(name) = entry.file_name().to_str().filter(|n| !n.contains('~')).map(str::to_string) else {
                continue;
            };
            let key = format!("{dir}{name}");
            if entry.file_type().map_err(|e| self.err(&path, &e))?.is_dir() {
                self.walk(&format!("{key}/"), keys)?;
            } else {
                keys.insert(key);
            }
        }
        Ok(())
    }
}

impl fmt::Display for DirObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl ObjectStore for DirObjects {
    fn get(&self, key: &str, max_len: usize) -> Result<Option<Object>> {
        let path = self.path(key)?;
        Ok(self.read(&path, max_len, key)?.map(|bytes| Object { version: Self::version(&bytes), bytes }))
    }

    fn read_into(&self, key: &str, offset: Option<u64>, buf: &mut BlockBuf) -> Result<ReadInto> {
        let path = self.path(key)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(ReadInto::Missing),
            Err(e) => return Err(self.err(&path, &e)),
        };
        let size = file.metadata().map_err(|e| self.err(&path, &e))?.len();
        if !super::holds(size, offset, buf.len()) {
            return Ok(ReadInto::WrongSize(size));
        }
        file.read_exact_at(buf, offset.unwrap_or(0)).map_err(|e| self.err(&path, &e))?;
        Ok(ReadInto::Filled)
    }

    fn put(&self, key: &str, data: &[u8], condition: Put<'_>, fence: Option<Fence<'_>>) -> Result<Option<String>> {
        let path = self.path(key)?;
        if let Some(fence) = fence {
            fence()?;
        }
        let version = Self::version(data);
        if condition == Put::Always {
            self.write(&path, data)?;
            return Ok(Some(version));
        }
        self.locked(|| {
            let current = self.read(&path, usize::MAX - 1, key)?;
            let holds = match (condition, current) {
                (Put::Always, _) => true,
                (Put::IfAbsent, current) => current.is_none(),
                (Put::IfVersion(v), Some(bytes)) => Self::version(&bytes) == v,
                (Put::IfVersion(_), None) => false,
            };
            if !holds {
                return Ok(None);
            }
            self.write(&path, data)?;
            Ok(Some(version))
        })
    }

    fn delete(&self, keys: &[String], fence: Option<Fence<'_>>) -> Result<()> {
        let paths = keys.iter().map(|k| self.path(k)).collect::<Result<Vec<_>>>()?;
        if let Some(fence) = fence {
            fence()?;
        }
        for path in paths {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(self.err(&path, &e)),
                _ => {}
            }
            lock(&self.unsynced).insert(path.parent().unwrap_or(&self.root).to_path_buf());
        }
        Ok(())
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, visit: &mut dyn FnMut(Listed) -> bool) -> Result<()> {
        let dir = prefix.rfind('/').map_or("", |i| &prefix[..=i]);
        let mut keys = BTreeSet::new();
        self.walk(dir, &mut keys)?;
        for key in keys.into_iter().filter(|k| k.starts_with(prefix) && start_after.is_none_or(|a| k.as_str() > a)) {
            let path = self.root.join(&key);
            // A file deleted since the walk is no longer listed.
            let metadata = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err(&path, &e)),
            };
            let modified = metadata.modified().map_err(|e| self.err(&path, &e))?;
            if !visit(Listed { key, size: metadata.len(), modified }) {
                break;
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let _syncing = lock(&self.syncing);
        let dirs: Vec<PathBuf> = lock(&self.unsynced).drain().collect();
        for (i, dir) in dirs.iter().enumerate() {
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                // Still to be synced by the next call; a directory removed since needs nothing.
                if e.kind() != ErrorKind::NotFound {
                    lock(&self.unsynced).extend(dirs[i..].iter().cloned());
                    return Err(self.err(dir, &e));
                }
            }
        }
        Ok(())
    }

    fn conditional_writes(&self) -> Result<bool> {
        Ok(true)
    }

    /// A read may wait on a disk and every write waits on an fsync: worth overlapping. A
    /// directory is walked in one call.
    fn capabilities(&self) -> Capabilities {
        Capabilities { slow_requests: true, sliced_listing: false, atomic_flush: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let root = tempfile::tempdir().unwrap();
        super::super::conformance::all(&DirObjects::new(root.path()).unwrap());
    }

    #[test]
    fn objects_are_files_at_their_keys_and_temporaries_are_not_listed() {
        let root = tempfile::tempdir().unwrap();
        let store = DirObjects::new(root.path()).unwrap();
        store.put("blocks/dev/0000000000001000", b"block", Put::Always, None).unwrap();
        assert_eq!(fs::read(root.path().join("blocks/dev/0000000000001000")).unwrap(), b"block");
        fs::write(root.path().join("blocks/dev/0000000000002000~1-0"), b"torn").unwrap();
        let mut listed = Vec::new();
        store
            .list("blocks/", None, &mut |l| {
                listed.push(l.key);
                true
            })
            .unwrap();
        assert_eq!(listed, ["blocks/dev/0000000000001000"]);
    }

    #[test]
    fn keys_that_climb_out_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = DirObjects::new(root.path()).unwrap();
        for key in ["../x", "a//b", "/etc/passwd", "a/./b"] {
            assert!(store.put(key, b"x", Put::Always, None).is_err(), "{key}");
        }
    }

    #[test]
    fn a_missing_root_directory_is_named() {
        let e = DirObjects::new(Path::new("/nonexistent/nbds3")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/nbds3"), "{e}");
    }
}

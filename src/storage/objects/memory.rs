//! `MemoryObjects`: objects in a map in RAM, for tests of every layout without a server, and
//! for throw-away devices.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{Listed, Object, ObjectStore, Put, ReadInto};
use crate::storage::{BlockBuf, Capabilities, Fence};
use crate::{lock, Error, Result};

/// The most objects [`MemoryObjects::list`] copies out at once.
const LIST_PAGE: usize = 1000;

/// One stored object.
#[derive(Debug)]
struct Stored {
    bytes: Vec<u8>,
    /// Unique within the store: a counter, so rewriting the same bytes still changes it.
    version: u64,
    modified: SystemTime,
}

/// Objects in RAM, gone with the process. Conditional writes are real compare-and-swaps.
#[derive(Debug, Default)]
pub struct MemoryObjects {
    objects: Mutex<BTreeMap<String, Stored>>,
    /// The last version given out.
    versions: Mutex<u64>,
}

impl MemoryObjects {
    fn next_version(&self) -> u64 {
        let mut v = lock(&self.versions);
        *v += 1;
        *v
    }
}

impl fmt::Display for MemoryObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemoryObjects")
    }
}

impl ObjectStore for MemoryObjects {
    fn get(&self, key: &str, max_len: usize) -> Result<Option<Object>> {
        let objects = lock(&self.objects);
        let Some(stored) = objects.get(key) else { return Ok(None) };
        if stored.bytes.len() > max_len {
            let message = format!("more than {max_len} bytes");
            return Err(Error::CorruptRecord { store: self.to_string(), key: key.to_string(), message });
        }
        Ok(Some(Object { bytes: stored.bytes.clone(), version: stored.version.to_string() }))
    }

    fn read_into(&self, key: &str, offset: Option<u64>, buf: &mut BlockBuf) -> Result<ReadInto> {
        let objects = lock(&self.objects);
        let Some(stored) = objects.get(key) else { return Ok(ReadInto::Missing) };
        let size = stored.bytes.len() as u64;
        let start = offset.unwrap_or(0);
        if !super::holds(size, offset, buf.len()) {
            return Ok(ReadInto::WrongSize(size));
        }
        let (start, len) = (start as usize, buf.len());
        buf.copy_from_slice(&stored.bytes[start..start + len]);
        Ok(ReadInto::Filled)
    }

    fn put(&self, key: &str, data: &[u8], condition: Put<'_>, fence: Option<Fence<'_>>) -> Result<Option<String>> {
        if let Some(fence) = fence {
            fence()?;
        }
        let mut objects = lock(&self.objects);
        let holds = match (condition, objects.get(key)) {
            (Put::Always, _) | (Put::IfAbsent, None) => true,
            (Put::IfVersion(v), Some(stored)) => stored.version.to_string() == v,
            (Put::IfAbsent, Some(_)) | (Put::IfVersion(_), None) => false,
        };
        if !holds {
            return Ok(None);
        }
        let version = self.next_version();
        objects.insert(key.to_string(), Stored { bytes: data.to_vec(), version, modified: SystemTime::now() });
        Ok(Some(version.to_string()))
    }

    fn delete(&self, keys: &[String], fence: Option<Fence<'_>>) -> Result<()> {
        if let Some(fence) = fence {
            fence()?;
        }
        let mut objects = lock(&self.objects);
        for key in keys {
            objects.remove(key);
        }
        Ok(())
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, visit: &mut dyn FnMut(Listed) -> bool) -> Result<()> {
        let mut from = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        loop {
            // Copied out a page at a time, so that `visit` may call back into the store, and a
            // listing that stops early (one slice of an export's blocks) copies little.
            let page: Vec<Listed> = lock(&self.objects)
                .range((from, Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(LIST_PAGE)
                .map(|(k, s)| Listed { key: k.clone(), size: s.bytes.len() as u64, modified: s.modified })
                .collect();
            let Some(last) = page.last().map(|l| l.key.clone()) else { return Ok(()) };
            let full = page.len() == LIST_PAGE;
            for item in page {
                if !visit(item) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
            from = Bound::Excluded(last);
        }
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn conditional_writes(&self) -> Result<bool> {
        Ok(true)
    }

    /// RAM: overlapping requests with the client's only costs copies and threads.
    fn capabilities(&self) -> Capabilities {
        Capabilities { slow_requests: false, sliced_listing: false, atomic_flush: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        super::super::conformance::all(&MemoryObjects::default());
    }

    #[test]
    fn listings_longer_than_a_page_are_whole_and_in_order() {
        let store = MemoryObjects::default();
        let keys: Vec<String> = (0..2 * LIST_PAGE + 500).map(|i| format!("p/{i:05}")).collect();
        for k in &keys {
            store.put(k, b"x", Put::Always, None).unwrap();
        }
        store.put("q/after", b"x", Put::Always, None).unwrap();
        let listed = |after: Option<&str>| {
            let mut found = Vec::new();
            store
                .list("p/", after, &mut |l| {
                    found.push(l.key);
                    true
                })
                .unwrap();
            found
        };
        assert_eq!(listed(None), keys);
        assert_eq!(listed(Some(&keys[LIST_PAGE])), keys[LIST_PAGE + 1..]);
    }
}

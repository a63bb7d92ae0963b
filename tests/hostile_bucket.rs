//! Objects that are not nbds3's where nbds3 keeps its small ones: a record or a lease of tens of
//! MiB (someone else's upload, a broken or hostile server) is refused after reading at most a
//! little of it, not read into memory whole.
//!
//! The test binary counts the memory every thread holds (the SDK reads on its runtime's threads),
//! so it holds this one test only.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use nbds3::storage::{s3, Backend};
use nbds3::ExportName;

/// The system allocator, counting the bytes held by all threads and the most ever held.
struct Counted;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = HELD.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed on to the system allocator unchanged; counting never allocates.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            HELD.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTED: Counted = Counted;

/// Runs `f`; returns what it returned and the most memory held meanwhile beyond what was held
/// before.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = HELD.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let value = f();
    (value, PEAK.load(Ordering::Relaxed).saturating_sub(start))
}

/// The bucket of this test.
const BUCKET: &str = "nbds3-test-hostile";

/// A 32 MiB object at an export's record key and at its lease key: reading either fails, naming
/// the key, having held far less than the object.
#[test]
fn huge_records_and_leases_are_refused_without_reading_them_whole() {
    let Some(env) = common::s3() else { return };
    // A bucket of its own: other tests list every export of theirs, and would meet this record.
    let config = env.config(BUCKET);
    nbds3::storage::s3::check_bucket(&config).unwrap();
    let export = ExportName::new(&common::unique("huge")).unwrap();
    let junk = vec![b'x'; 32 << 20];
    env.put(BUCKET, &export.record_key(), &junk);
    env.put(BUCKET, &export.lease_key(), &junk);
    drop(junk);
    let backend = s3::backend(&config).unwrap();
    let (record, record_peak) = peak_allocation(|| backend.read_record(&export));
    let (lease, lease_peak) = peak_allocation(|| backend.read_lease(&export));
    backend.delete_record(&export).unwrap();
    for (what, key, outcome, peak) in [
        ("record", export.record_key(), record.map(drop), record_peak),
        ("lease", export.lease_key(), lease.map(drop), lease_peak),
    ] {
        let e = outcome.expect_err(what).to_string();
        assert!(e.contains(&key) && e.contains("not a record or lease of nbds3"), "{what}: {e}");
        assert!(peak < 8 << 20, "reading the {what} held {peak} bytes at once");
    }
}

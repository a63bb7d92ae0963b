//! The conformance suite every [`Storage`] backend and decorator runs, so they all keep one contract.
//!
//! Each check takes an `open(place)` function: opening the same `place` twice must reach the same
//! stored blocks (a new instance on the same directory, bucket prefix or export), and distinct
//! places must be independent. Backends that keep nothing (memory) say so with `persistent: false`.

use std::sync::Arc;

use super::{Backend, BlockBuf, BlockId, Expect, Storage};
use crate::ExportName;

/// The block size the suite uses.
pub const BLOCK_SIZE: usize = 4096;

/// Opens a store at a numbered place.
pub type Open<'a> = &'a (dyn Fn(u32) -> Box<dyn Storage> + Sync);

fn pattern(seed: u8) -> Vec<u8> {
    (0..BLOCK_SIZE).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

/// Reads into a buffer full of garbage, as recycled buffers are: every byte must be overwritten.
fn read(s: &dyn Storage, id: u64) -> (bool, Vec<u8>) {
    let mut buf = BlockBuf::copy_of(&[0xee; BLOCK_SIZE]);
    let present = s.read_block(BlockId(id), &mut buf).expect("read_block");
    (present, buf.to_vec())
}

/// A block never written reads as zeros and reports itself absent.
pub fn unwritten_reads_zero(open: Open<'_>) {
    let s = open(1);
    assert_eq!(s.block_size(), BLOCK_SIZE);
    for id in [0, 1, 12345, u64::MAX / BLOCK_SIZE as u64] {
        assert_eq!(read(&*s, id), (false, vec![0; BLOCK_SIZE]), "{s} block {id}");
    }
    assert!(s.list_blocks().expect("list").is_empty(), "{s}: list of an empty store");
}

/// What is written reads back, and only that block changes.
pub fn write_read_roundtrip(open: Open<'_>) {
    let s = open(2);
    s.write_block(BlockId(7), &pattern(7)).expect("write");
    assert_eq!(read(&*s, 7), (true, pattern(7)), "{s}");
    assert!(!read(&*s, 6).0, "{s}: neighbour");
    assert!(!read(&*s, 8).0, "{s}: neighbour");
}

/// A second write replaces the first.
pub fn overwrite(open: Open<'_>) {
    let s = open(3);
    s.write_block(BlockId(1), &pattern(1)).expect("write");
    s.write_block(BlockId(1), &pattern(2)).expect("overwrite");
    assert_eq!(read(&*s, 1), (true, pattern(2)), "{s}");
}

/// Deleting makes a block read as zeros; deleting again, or a block never written, is fine.
pub fn delete_is_idempotent(open: Open<'_>) {
    let s = open(4);
    s.write_block(BlockId(3), &pattern(3)).expect("write");
    s.delete_block(BlockId(3)).expect("delete");
    assert_eq!(read(&*s, 3), (false, vec![0; BLOCK_SIZE]), "{s}");
    s.delete_block(BlockId(3)).expect("delete again");
    s.delete_block(BlockId(99)).expect("delete never written");
}

/// The list holds exactly the stored blocks, in order.
pub fn list_reports_stored_blocks(open: Open<'_>) {
    let s = open(5);
    for id in [9, 2, 1 << 20, 5] {
        s.write_block(BlockId(id), &pattern(id as u8)).expect("write");
    }
    s.delete_block(BlockId(5)).expect("delete");
    let ids: Vec<u64> = s.list_blocks().expect("list").into_iter().map(|b| b.0).collect();
    assert_eq!(ids, vec![2, 9, 1 << 20], "{s}");
}

/// Listing a range of block indexes returns exactly the stored blocks in it.
pub fn list_in_a_range(open: Open<'_>) {
    let s = open(10);
    for id in [0, 1, 999, 1000, 1001, 5000, 1 << 40] {
        s.write_block(BlockId(id), &pattern(id as u8)).expect("write");
    }
    let ids = |r: std::ops::Range<u64>| s.list_blocks_in(r).expect("list").into_iter().map(|b| b.0).collect::<Vec<_>>();
    assert_eq!(ids(0..1000), vec![0, 1, 999], "{s}");
    assert_eq!(ids(1000..5000), vec![1000, 1001], "{s}");
    assert_eq!(ids(1001..u64::MAX), vec![1001, 5000, 1 << 40], "{s}");
    assert_eq!(ids(2..999), Vec::<u64>::new(), "{s}");
}

/// A buffer of the wrong length is an error, not a panic or a short block.
pub fn wrong_length_is_an_error(open: Open<'_>) {
    let s = open(6);
    assert!(s.write_block(BlockId(0), &[1u8; 100]).is_err(), "{s}: short write");
    assert!(s.read_block(BlockId(0), &mut BlockBuf::zeroed(100)).is_err(), "{s}: short read");
    assert!(!read(&*s, 0).0, "{s}: failed write stored something");
}

/// Many threads writing and reading distinct blocks see only their own data.
pub fn concurrent_distinct_blocks(open: Open<'_>) {
    let s: Arc<dyn Storage> = Arc::from(open(7));
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let s = &s;
            scope.spawn(move || {
                for round in 0..4u64 {
                    let id = t * 100 + round;
                    let data = pattern((t * 4 + round) as u8);
                    s.write_block(BlockId(id), &data).expect("write");
                    assert_eq!(read(&**s, id), (true, data), "{s} block {id}");
                }
            });
        }
    });
    assert_eq!(s.list_blocks().expect("list").len(), 32, "{s}");
}

/// A batch delete removes exactly the blocks named, including ones never written.
pub fn delete_blocks_removes_each(open: Open<'_>) {
    let s = open(9);
    for id in 0..5 {
        s.write_block(BlockId(id), &pattern(id as u8)).expect("write");
    }
    s.delete_blocks(&[BlockId(1), BlockId(3), BlockId(77)]).expect("delete_blocks");
    let ids: Vec<u64> = s.list_blocks().expect("list").into_iter().map(|b| b.0).collect();
    assert_eq!(ids, vec![0, 2, 4], "{s}");
}

/// After `flush`, a new instance on the same place reads what was written and not what was deleted.
pub fn flush_survives_reopen(open: Open<'_>) {
    let s = open(8);
    s.write_block(BlockId(10), &pattern(10)).expect("write");
    s.write_block(BlockId(11), &pattern(11)).expect("write");
    s.delete_block(BlockId(11)).expect("delete");
    s.flush().expect("flush");
    drop(s);
    let again = open(8);
    assert_eq!(read(&*again, 10), (true, pattern(10)), "{again}");
    assert!(!read(&*again, 11).0, "{again}");
    assert_eq!(again.list_blocks().expect("list"), vec![BlockId(10)], "{again}");
}

/// Runs every check; `persistent` backends also run the reopen check.
pub fn run_all(open: Open<'_>, persistent: bool) {
    unwritten_reads_zero(open);
    write_read_roundtrip(open);
    overwrite(open);
    delete_is_idempotent(open);
    list_reports_stored_blocks(open);
    list_in_a_range(open);
    wrong_length_is_an_error(open);
    concurrent_distinct_blocks(open);
    delete_blocks_removes_each(open);
    if persistent {
        flush_survives_reopen(open);
    }
}

/// A backend keeps each export's record and lists exactly the exports that have one; `prefix`
/// keeps this run's export names apart from others in a shared bucket.
pub fn backend_records(backend: &dyn Backend, prefix: &str) {
    let a = ExportName::new(&format!("{prefix}a")).expect("name");
    let b = ExportName::new(&format!("{prefix}b")).expect("name");
    assert_eq!(backend.read_record(&a).expect("read"), None, "{backend}");
    backend.write_record(&a, "size=1\n").expect("write");
    backend.write_record(&b, "size=2\n").expect("write");
    assert_eq!(backend.read_record(&a).expect("read").as_deref(), Some("size=1\n"), "{backend}");
    let mine =
        |names: Vec<ExportName>| names.into_iter().filter(|n| n.as_str().starts_with(prefix)).collect::<Vec<_>>();
    assert_eq!(mine(backend.list_exports().expect("list")), vec![a.clone(), b.clone()], "{backend}");
    let blocks = backend.open(&a, BLOCK_SIZE).expect("open");
    blocks.write_block(BlockId(1), &pattern(1)).expect("write");
    assert_eq!(read(&*backend.open(&a, BLOCK_SIZE).expect("open"), 1), (true, pattern(1)), "{backend}: same blocks");
    assert!(!read(&*backend.open(&b, BLOCK_SIZE).expect("open"), 1).0, "{backend}: exports share blocks");
    blocks.delete_block(BlockId(1)).expect("delete");
    backend.delete_record(&a).expect("delete record");
    backend.delete_record(&a).expect("delete record again");
    assert_eq!(mine(backend.list_exports().expect("list")), vec![b.clone()], "{backend}");
    backend.delete_record(&b).expect("delete record");
}

/// A backend keeps each export's lease, and when it says its leases are atomic, a replace that
/// expects a stale state fails, and of two racing creators exactly one wins.
pub fn backend_leases(backend: &dyn Backend, prefix: &str) {
    let a = ExportName::new(&format!("{prefix}leased")).expect("name");
    backend.write_record(&a, "size=1\n").expect("write");
    assert_eq!(backend.read_lease(&a).expect("read"), None, "{backend}");
    let atomic = backend.atomic_leases().expect("atomic_leases");
    let v1 = backend.replace_lease(&a, Expect::Absent, "one").expect("create").expect("created");
    let read = backend.read_lease(&a).expect("read").expect("a lease");
    assert_eq!((read.text.as_str(), &read.version), ("one", &v1), "{backend}");
    let v2 = backend.replace_lease(&a, Expect::Version(&v1), "two").expect("replace").expect("replaced");
    assert_ne!(v1, v2, "{backend}: a new lease needs a new version");
    if atomic {
        assert_eq!(backend.replace_lease(&a, Expect::Absent, "x").expect("replace"), None, "{backend}");
        assert_eq!(backend.replace_lease(&a, Expect::Version(&v1), "x").expect("replace"), None, "{backend}");
    }
    assert_eq!(backend.read_lease(&a).expect("read").map(|v| v.text).as_deref(), Some("two"), "{backend}");
    assert!(!backend.list_exports().expect("list").iter().any(|n| n.as_str().starts_with("leases")), "{backend}");
    backend.delete_record(&a).expect("delete record");
    assert_eq!(backend.read_lease(&a).expect("read"), None, "{backend}: deleting an export deletes its lease");

    if atomic {
        let b = ExportName::new(&format!("{prefix}raced")).expect("name");
        let b = &b;
        let winners = std::thread::scope(|s| {
            let racers: Vec<_> = (0..8)
                .map(|i| s.spawn(move || backend.replace_lease(b, Expect::Absent, &format!("racer {i}"))))
                .collect();
            racers.into_iter().map(|r| r.join().expect("racer")).filter(|r| matches!(r, Ok(Some(_)))).count()
        });
        assert_eq!(winners, 1, "{backend}: racing creators");
        backend.delete_record(b).expect("delete record");
    }
}

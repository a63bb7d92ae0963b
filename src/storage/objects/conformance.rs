//! The conformance checks every [`ObjectStore`] runs, so the memory, file and S3 stores keep one
//! contract and every layout can trust it.
//!
//! Each check works under a prefix of its own, so one store (a shared bucket) can run them all
//! at once and again later.

use std::sync::Barrier;

use super::{Listed, ObjectStore, Put, ReadInto};
use crate::storage::BlockBuf;

/// Runs every check against `store`.
pub fn all(store: &dyn ObjectStore) {
    let run = format!("conformance-{}/", crate::unix_nanos());
    whole_objects(store, &format!("{run}whole/"));
    reads_into_buffers(store, &format!("{run}into/"));
    conditional_puts(store, &format!("{run}cas/"));
    listing(store, &format!("{run}list/"));
    deleting(store, &format!("{run}delete/"));
    if store.conditional_writes().expect("conditional_writes") {
        racing_writers_one_wins(store, &format!("{run}race/"));
    }
}

fn put(store: &dyn ObjectStore, key: &str, data: &[u8]) -> String {
    store.put(key, data, Put::Always, None).expect("put").expect("an unconditional put is never refused")
}

fn keys(store: &dyn ObjectStore, prefix: &str, start_after: Option<&str>) -> Vec<String> {
    let mut found = Vec::new();
    store
        .list(prefix, start_after, &mut |l: Listed| {
            found.push(l.key);
            true
        })
        .expect("list");
    found
}

/// What is put reads back whole with a version; other bytes give another version; an object
/// over the caller's limit is refused, not read.
pub fn whole_objects(store: &dyn ObjectStore, p: &str) {
    let key = format!("{p}a");
    assert_eq!(store.get(&key, 100).expect("get"), None, "{store}: {key} before any put");
    let v1 = put(store, &key, b"first");
    let got = store.get(&key, 100).expect("get").expect("present");
    assert_eq!((got.bytes.as_slice(), got.version.as_str()), (&b"first"[..], v1.as_str()), "{store}");
    let v2 = put(store, &key, b"second");
    assert_ne!(v1, v2, "{store}: new bytes, same version");
    assert_eq!(store.get(&key, 100).expect("get").expect("present").bytes, b"second", "{store}");
    let err = store.get(&key, 3).expect_err("an object over max_len").to_string();
    assert!(err.contains(&key), "{store}: {err}");
    put(store, &format!("{p}empty"), b"");
    assert_eq!(store.get(&format!("{p}empty"), 0).expect("get").expect("present").bytes, b"", "{store}");
}

/// Whole and ranged reads fill the buffer exactly, and say when the object does not fit.
pub fn reads_into_buffers(store: &dyn ObjectStore, p: &str) {
    let key = format!("{p}block");
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut buf = BlockBuf::copy_of(&[0xee; 8192]);
    assert_eq!(store.read_into(&key, None, &mut buf).expect("read"), ReadInto::Missing, "{store}");
    put(store, &key, &data);
    assert_eq!(store.read_into(&key, None, &mut buf).expect("read"), ReadInto::Filled, "{store}");
    assert_eq!(&buf[..], &data[..], "{store}: whole read");
    let mut part = BlockBuf::copy_of(&[0xee; 4096]);
    assert_eq!(store.read_into(&key, Some(4096), &mut part).expect("read"), ReadInto::Filled, "{store}");
    assert_eq!(&part[..], &data[4096..], "{store}: ranged read");
    assert_eq!(store.read_into(&key, Some(1), &mut part).expect("read"), ReadInto::Filled, "{store}");
    assert_eq!(&part[..], &data[1..4097], "{store}: unaligned ranged read");
    assert_eq!(store.read_into(&key, None, &mut part).expect("read"), ReadInto::WrongSize(8192), "{store}");
    assert_eq!(store.read_into(&key, Some(4097), &mut part).expect("read"), ReadInto::WrongSize(8192), "{store}");
}

/// `IfAbsent` creates once; `IfVersion` replaces only the version it names.
pub fn conditional_puts(store: &dyn ObjectStore, p: &str) {
    let honoured = store.conditional_writes().expect("conditional_writes");
    let key = format!("{p}head");
    let v1 = store.put(&key, b"one", Put::IfAbsent, None).expect("put").expect("absent, so created");
    let again = store.put(&key, b"two", Put::IfAbsent, None).expect("put");
    let v2 = store.put(&key, b"three", Put::IfVersion(&v1), None).expect("put");
    if !honoured {
        return;
    }
    assert_eq!(again, None, "{store}: IfAbsent over an existing object");
    let v2 = v2.expect("IfVersion of the current version");
    assert_eq!(store.put(&key, b"four", Put::IfVersion(&v1), None).expect("put"), None, "{store}: stale version");
    assert_eq!(store.get(&key, 100).expect("get").expect("present").bytes, b"three", "{store}");
    assert!(store.put(&key, b"five", Put::IfVersion(&v2), None).expect("put").is_some(), "{store}");
    let missing = store.put(&format!("{p}missing"), b"x", Put::IfVersion(&v2), None).expect("put");
    assert_eq!(missing, None, "{store}: IfVersion of a missing object");
}

/// Listing visits a prefix's keys in order, after `start_after`, and stops when asked.
pub fn listing(store: &dyn ObjectStore, p: &str) {
    let names = ["a", "b/1", "b/2", "c", "d"];
    for n in names.iter().rev() {
        put(store, &format!("{p}{n}"), n.as_bytes());
    }
    // A key that shares the prefix's text but not its directory.
    put(store, &format!("{}x/outside", p.trim_end_matches('/')), b"x");
    let all: Vec<String> = names.iter().map(|n| format!("{p}{n}")).collect();
    assert_eq!(keys(store, p, None), all, "{store}");
    assert_eq!(keys(store, &format!("{p}b/"), None), all[1..3], "{store}: a sub-prefix");
    assert_eq!(keys(store, p, Some(&all[1])), all[2..], "{store}: start_after");
    let mut first_two = Vec::new();
    store
        .list(p, None, &mut |l: Listed| {
            assert_eq!(l.size, l.key.len() as u64 - p.len() as u64, "{store}: size of {}", l.key);
            first_two.push(l.key);
            first_two.len() < 2
        })
        .expect("list");
    assert_eq!(first_two, all[..2], "{store}: stopped after two");
}

/// Deleting removes exactly the keys named, missing ones included.
pub fn deleting(store: &dyn ObjectStore, p: &str) {
    let all: Vec<String> = (0..5).map(|i| format!("{p}{i}")).collect();
    for k in &all {
        put(store, k, b"x");
    }
    store.delete(&[all[1].clone(), all[3].clone(), format!("{p}never")], None).expect("delete");
    assert_eq!(keys(store, p, None), [all[0].clone(), all[2].clone(), all[4].clone()], "{store}");
    store.delete(&all, None).expect("delete");
    assert!(keys(store, p, None).is_empty(), "{store}");
    store.sync().expect("sync");
}

/// Of eight writers replacing one version with bytes of their own, exactly one wins.
pub fn racing_writers_one_wins(store: &dyn ObjectStore, p: &str) {
    let key = format!("{p}head");
    let v0 = put(store, &key, b"start");
    let barrier = Barrier::new(8);
    let wins: usize = std::thread::scope(|s| {
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let (key, v0, barrier) = (&key, &v0, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let won = store.put(key, format!("writer {i}").as_bytes(), Put::IfVersion(v0), None);
                    usize::from(won.expect("put").is_some())
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().expect("racer")).sum()
    });
    assert_eq!(wins, 1, "{store}: writers that replaced the same version");
}

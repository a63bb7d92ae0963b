//! Tests of `CasStorage` and the `cas` operations on a [`MemoryObjects`] store.

use super::format::{chunk_key, head_key};
use super::ops::{self, Change, ChangedRange};
use super::*;
use crate::storage::conformance::{self, BLOCK_SIZE};
use crate::storage::objects::faulty::FaultyObjects;
use crate::storage::objects::MemoryObjects;
use std::collections::BTreeMap;
use std::sync::Mutex;

fn name(s: &str) -> ExportName {
    ExportName::new(s).unwrap()
}

fn open(store: &Arc<MemoryObjects>, export: &str) -> CasStorage {
    CasStorage::open(store.clone(), &name(export), BLOCK_SIZE, CasConfig::default()).unwrap()
}

fn block(seed: u8) -> Vec<u8> {
    (0..BLOCK_SIZE).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1).collect()
}

fn read(s: &dyn Storage, id: u64) -> Option<Vec<u8>> {
    let mut buf = BlockBuf::zeroed(s.block_size());
    s.read_block(BlockId(id), &mut buf).unwrap().then(|| buf.to_vec())
}

fn keys(store: &MemoryObjects, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    store
        .list(prefix, None, &mut |l| {
            found.push(l.key);
            true
        })
        .unwrap();
    found
}

#[test]
fn conformance_with_tiny_memory_limits() {
    let store = Arc::new(MemoryObjects::default());
    for delta_entries in [0, 3, DEFAULT_DELTA_ENTRIES] {
        let config = CasConfig { cached_pages: 1, max_dirty_pages: 2, delta_entries, ..CasConfig::default() };
        conformance::run_all(
            &|place| {
                let export = name(&format!("e{delta_entries}-{place}"));
                Box::new(CasStorage::open(store.clone(), &export, BLOCK_SIZE, config).unwrap())
            },
            true,
        );
    }
}

#[test]
fn writes_show_after_reopen_only_once_flushed() {
    let store = Arc::new(MemoryObjects::default());
    let s = open(&store, "e");
    s.write_block(BlockId(1), &block(1)).unwrap();
    assert_eq!(read(&open(&store, "e"), 1), None, "unflushed writes are not committed");
    assert_eq!(s.list_blocks().unwrap(), vec![BlockId(1)], "listing sees unflushed writes");
    let (start, end) = (5, 2);
    assert_eq!(s.list_blocks_in(start..end).unwrap(), vec![], "a backwards range holds nothing");
    assert!(keys(&store, "cas/pages/").is_empty(), "listing writes nothing");
    s.flush().unwrap();
    s.write_block(BlockId(2), &block(2)).unwrap();
    let again = open(&store, "e");
    assert_eq!((read(&again, 1), read(&again, 2)), (Some(block(1)), None));
}

#[test]
fn identical_blocks_are_stored_once_across_exports() {
    let store = Arc::new(MemoryObjects::default());
    let (a, b) = (open(&store, "a"), open(&store, "b"));
    for id in 0..10 {
        a.write_block(BlockId(id * 5000), &block(9)).unwrap();
        b.write_block(BlockId(id), &block(9)).unwrap();
    }
    a.flush().unwrap();
    b.flush().unwrap();
    assert_eq!(keys(&store, "cas/chunks/"), vec![chunk_key(&Hash::of(&block(9)))]);
    assert_eq!(read(&open(&store, "a"), 45000), Some(block(9)));
}

#[test]
fn a_flush_without_changes_writes_nothing() {
    let store = Arc::new(MemoryObjects::default());
    let s = open(&store, "e");
    s.flush().unwrap();
    assert!(keys(&store, "cas/").is_empty(), "{:?}", keys(&store, "cas/"));
    s.write_block(BlockId(3), &block(3)).unwrap();
    s.flush().unwrap();
    let head = store.get(&head_key(&name("e")), 4096).unwrap().unwrap();
    s.flush().unwrap();
    assert_eq!(store.get(&head_key(&name("e")), 4096).unwrap().unwrap().version, head.version);
}

#[test]
fn a_second_writer_fences_the_first() {
    let store = Arc::new(MemoryObjects::default());
    let first = open(&store, "e");
    first.write_block(BlockId(0), &block(0)).unwrap();
    first.flush().unwrap();
    let second = open(&store, "e");
    second.write_block(BlockId(1), &block(1)).unwrap();
    second.flush().unwrap();
    first.write_block(BlockId(2), &block(2)).unwrap();
    let err = first.flush().unwrap_err().to_string();
    assert!(err.contains("another writer committed export e") && err.contains("cas/heads/e"), "{err}");
    assert!(first.write_block(BlockId(3), &block(3)).unwrap_err().to_string().contains("another writer"));
    assert!(first.flush().is_err(), "a fenced store stays fenced");
    let now = open(&store, "e");
    assert_eq!((read(&now, 0), read(&now, 1), read(&now, 2)), (Some(block(0)), Some(block(1)), None));
}

#[test]
fn corrupt_or_missing_objects_are_errors_naming_them() {
    let store = Arc::new(MemoryObjects::default());
    // Block 4 in the tree, so there is a page to corrupt.
    let s =
        CasStorage::open(store.clone(), &name("e"), BLOCK_SIZE, CasConfig { delta_entries: 0, ..CasConfig::default() })
            .unwrap();
    s.write_block(BlockId(4), &block(4)).unwrap();
    s.flush().unwrap();
    let key = chunk_key(&Hash::of(&block(4)));
    store.put(&key, &block(5), Put::Always, None).unwrap();
    let mut buf = BlockBuf::zeroed(BLOCK_SIZE);
    let err = open(&store, "e").read_block(BlockId(4), &mut buf).unwrap_err().to_string();
    assert!(err.contains(&key) && err.contains("does not hash to its name"), "{err}");
    store.put(&key, &block(5)[..100], Put::Always, None).unwrap();
    let err = open(&store, "e").read_block(BlockId(4), &mut buf).unwrap_err().to_string();
    assert!(err.contains(&key) && err.contains("is 100 bytes"), "{err}");
    let root = open(&store, "e").committed_root().page.unwrap();
    let page = format::page_key(&root);
    let bytes = store.get(&page, MAX_PAGE_BYTES).unwrap().unwrap().bytes;
    store.put(&page, &bytes[..bytes.len() - 3], Put::Always, None).unwrap();
    let err = open(&store, "e").read_block(BlockId(4), &mut buf).unwrap_err().to_string();
    assert!(err.contains(&page), "{err}");
    store.put(&head_key(&name("e")), b"nbds3-cas-head 9\n", Put::Always, None).unwrap();
    let err = CasStorage::open(store.clone(), &name("e"), BLOCK_SIZE, CasConfig::default()).unwrap_err().to_string();
    assert!(err.contains("cas/heads/e") && err.contains("format version 9"), "{err}");
    let err = CasStorage::open(store.clone(), &name("x"), BLOCK_SIZE, CasConfig::default());
    assert!(err.is_ok(), "an export with no head is all holes");
}

#[test]
fn snapshots_and_clones_share_blocks_and_stay_apart() {
    let store = Arc::new(MemoryObjects::default());
    let (e, snap) = (name("e"), name("before"));
    let s = open(&store, "e");
    s.write_block(BlockId(0), &block(1)).unwrap();
    s.write_block(BlockId(2000), &block(2)).unwrap();
    s.flush().unwrap();
    s.write_block(BlockId(1), &block(99)).unwrap(); // not flushed: not in the snapshot
    ops::take_snapshot(&*store, &e, &snap, 1 << 30, BLOCK_SIZE).unwrap();
    let again = ops::take_snapshot(&*store, &e, &snap, 1 << 30, BLOCK_SIZE).unwrap_err().to_string();
    assert!(again.contains("already has a snapshot before"), "{again}");
    s.write_block(BlockId(0), &block(3)).unwrap();
    s.flush().unwrap();

    let frozen = CasStorage::open_snapshot(store.clone(), &e, &snap, BLOCK_SIZE).unwrap();
    assert_eq!((read(&frozen, 0), read(&frozen, 1), read(&frozen, 2000)), (Some(block(1)), None, Some(block(2))));
    assert!(frozen.write_block(BlockId(0), &block(0)).unwrap_err().to_string().contains("read-only"));

    let record = ops::clone_snapshot(&*store, &e, &snap, &name("c")).unwrap();
    assert_eq!(record.device_size, 1 << 30);
    assert!(ops::clone_snapshot(&*store, &e, &snap, &name("c"))
        .unwrap_err()
        .to_string()
        .contains("already has a cas head"));
    let c = open(&store, "c");
    assert_eq!(read(&c, 0), Some(block(1)));
    c.write_block(BlockId(2000), &block(7)).unwrap();
    c.flush().unwrap();
    assert_eq!(read(&open(&store, "e"), 2000), Some(block(2)), "a clone's writes do not show on its origin");
    assert_eq!(read(&CasStorage::open_snapshot(store.clone(), &e, &snap, BLOCK_SIZE).unwrap(), 2000), Some(block(2)));

    assert_eq!(ops::list_snapshots(&*store, &e).unwrap(), vec![snap.clone()]);
    ops::delete_snapshot(&*store, &e, &snap).unwrap();
    assert!(ops::list_snapshots(&*store, &e).unwrap().is_empty());
    assert_eq!(read(&open(&store, "c"), 0), Some(block(1)), "deleting the snapshot leaves the clone whole");
    let err = CasStorage::open_snapshot(store.clone(), &e, &snap, BLOCK_SIZE).unwrap_err().to_string();
    assert!(err.contains("export e has no snapshot before"), "{err}");
}

#[test]
fn diffs_list_changed_runs_and_skip_equal_subtrees() {
    let store = Arc::new(FaultyObjects::new(true));
    let e = name("e");
    let s = CasStorage::open(store.clone(), &e, BLOCK_SIZE, CasConfig::default()).unwrap();
    for id in (0..20_000).step_by(7) {
        s.write_block(BlockId(id), &block(id as u8)).unwrap();
    }
    s.flush().unwrap();
    let before = s.committed_root();
    s.write_block(BlockId(7), &block(200)).unwrap();
    s.write_block(BlockId(8), &block(201)).unwrap();
    s.write_block(BlockId(9), &block(202)).unwrap();
    s.delete_block(BlockId(14)).unwrap();
    s.write_block(BlockId(1 << 24), &block(1)).unwrap(); // grows the map a level
    s.flush().unwrap();
    let after = s.committed_root();
    store.reads.store(0, Ordering::Relaxed);
    let runs = ops::diff(&*store, &before, &after).unwrap();
    let run = |first, blocks, change| ChangedRange { first, blocks, change };
    assert_eq!(
        runs,
        vec![run(7, 3, Change::Data), run(14, 1, Change::Zero), run(1 << 24, 1, Change::Data)],
        "{runs:?}"
    );
    // Both roots, the first leaf in each, and the new path to block 1<<24: not the 19 other leaves.
    assert!(store.reads.load(Ordering::Relaxed) <= 8, "{} GETs", store.reads.load(Ordering::Relaxed));
    let back = ops::diff(&*store, &after, &before).unwrap();
    assert_eq!(back[1], run(8, 2, Change::Zero), "{back:?}");
    assert_eq!(ops::diff(&*store, &after, &after).unwrap(), vec![]);
    let all = ops::diff(&*store, &Root::EMPTY, &before).unwrap();
    assert_eq!(all.iter().map(|r| r.blocks).sum::<u64>(), 20_000u64.div_ceil(7));
}

#[test]
fn a_large_export_opens_with_one_get_and_keeps_its_memory_bounded() {
    let store = Arc::new(FaultyObjects::new(true));
    let e = name("big");
    let config = CasConfig { cached_pages: 4, max_dirty_pages: 8, ..CasConfig::default() };
    let blocks = (1u64 << 40) / BLOCK_SIZE as u64; // 1 TiB
    let s = CasStorage::open(store.clone(), &e, BLOCK_SIZE, config).unwrap();
    let mut written = Vec::new();
    for i in 0..3000u64 {
        let id = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % blocks;
        s.write_block(BlockId(id), &block(i as u8)).unwrap();
        written.push((id, i as u8));
        let st = lock(&s.state);
        assert!(st.map.dirty_pages() <= 8 + 3, "{} changed pages kept", st.map.dirty_pages());
        assert!(
            st.cache.len() <= 4 && st.pending.is_empty(),
            "{} cached, {} pending",
            st.cache.len(),
            st.pending.len()
        );
    }
    s.flush().unwrap();
    store.reads.store(0, Ordering::Relaxed);
    let again = CasStorage::open(store.clone(), &e, BLOCK_SIZE, config).unwrap();
    assert_eq!(store.reads.load(Ordering::Relaxed), 1, "open reads the head and nothing else");
    for (id, seed) in written.iter().step_by(97) {
        assert_eq!(read(&again, *id), Some(block(*seed)), "block {id}");
    }
}

#[test]
fn a_store_without_conditional_writes_is_refused_unless_opted_in() {
    let store = Arc::new(FaultyObjects::new(false));
    let err = CasStorage::open(store.clone(), &name("e"), BLOCK_SIZE, CasConfig::default()).unwrap_err().to_string();
    assert!(err.contains("does not honour conditional writes") && err.contains("cas export e"), "{err}");
    let config = CasConfig { allow_unconditional: true, ..CasConfig::default() };
    let s = CasStorage::open(store, &name("e"), BLOCK_SIZE, config).unwrap();
    s.write_block(BlockId(0), &block(0)).unwrap();
    s.flush().unwrap();
}

#[test]
fn writers_and_flushes_running_at_once_lose_nothing() {
    // Folds racing writes and flushes too, with a small delta.
    for delta_entries in [0, 5, DEFAULT_DELTA_ENTRIES] {
        writers_and_flushes_at_once(delta_entries);
    }
}

fn writers_and_flushes_at_once(delta_entries: usize) {
    let store = Arc::new(MemoryObjects::default());
    let config = CasConfig { cached_pages: 3, max_dirty_pages: 4, delta_entries, ..CasConfig::default() };
    let s = CasStorage::open(store.clone(), &name("busy"), BLOCK_SIZE, config).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                s.flush().unwrap();
            }
        });
        let writers: Vec<_> = (0..6u64)
            .map(|t| {
                let s = &s;
                scope.spawn(move || {
                    for i in 0..150u64 {
                        // Threads share leaves (ids interleave) and reach into a second level.
                        let id = i * 6 + t + if i % 10 == 0 { 1 << 21 } else { 0 };
                        s.write_block(BlockId(id), &block((id % 251) as u8)).unwrap();
                        if i % 7 == 0 {
                            s.delete_block(BlockId(id)).unwrap();
                        }
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().unwrap());
        done.store(true, Ordering::Relaxed);
    });
    s.flush().unwrap();
    let again = open(&store, "busy");
    for t in 0..6u64 {
        for i in 0..150u64 {
            let id = i * 6 + t + if i % 10 == 0 { 1 << 21 } else { 0 };
            let expected = (i % 7 != 0).then(|| block((id % 251) as u8));
            assert_eq!(read(&again, id), expected, "block {id}, delta_entries {delta_entries}");
        }
    }
}

/// What one operation cost on a [`FaultyObjects`]: GETs, PUTs, bytes PUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cost {
    gets: u64,
    puts: u64,
    bytes: u64,
}

fn cost(store: &Arc<FaultyObjects>, op: impl FnOnce()) -> Cost {
    let put_keys = Arc::new(Mutex::new(Vec::new()));
    let keys = put_keys.clone();
    store.before_each(move |request| {
        if let crate::storage::objects::faulty::Request::Put(key) = request {
            lock(&keys).push(key.to_string());
        }
        Ok(())
    });
    store.reads.store(0, Ordering::Relaxed);
    store.writes.store(0, Ordering::Relaxed);
    op();
    store.clear_hook();
    let (gets, puts) = (store.reads.load(Ordering::Relaxed), store.writes.load(Ordering::Relaxed));
    let bytes =
        lock(&put_keys).iter().map(|k| store.get(k, usize::MAX).unwrap().map_or(0, |o| o.bytes.len() as u64)).sum();
    Cost { gets, puts, bytes }
}

/// The block size of [`sparse_terabyte`]'s export.
const BS: usize = 4096;

/// Where the `i`th write of [`sparse_terabyte`]'s export goes: spread over the whole device.
fn scattered(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % ((1u64 << 40) / BS as u64)
}

/// The `i`th block written to [`sparse_terabyte`]'s export: distinct for every `i`.
fn sparse_block(i: u64) -> Vec<u8> {
    indexed_block(BS, i, (i % 251) as u8 + 1)
}

/// Export `big`, 1 TiB of 4 KiB blocks with `mapped` scattered blocks committed in its tree (no
/// delta), on a store that counts requests: the map of a large, sparsely used device.
fn sparse_terabyte(mapped: u64) -> (Arc<FaultyObjects>, ExportName) {
    let store = Arc::new(FaultyObjects::new(true));
    let e = name("big");
    let tree_only = CasConfig { delta_entries: 0, ..CasConfig::default() };
    let setup = CasStorage::open(store.clone(), &e, BS, tree_only).unwrap();
    for i in 0..mapped {
        setup.write_block(BlockId(scattered(i)), &sparse_block(i)).unwrap();
    }
    setup.flush().unwrap();
    (store, e)
}

/// The requests of the operations docs/CAS-FORMAT.md measures, on a 1 TiB export of 4 KiB blocks
/// with 20 000 random blocks mapped (a 3-level tree), opened with `delta_entries`.
fn request_table(delta_entries: usize) -> Vec<(&'static str, Cost)> {
    let (store, e) = sparse_terabyte(20_000);
    let config = CasConfig { delta_entries, ..CasConfig::default() };
    let mut opened = None;
    let mut table =
        vec![("open", cost(&store, || opened = Some(CasStorage::open(store.clone(), &e, BS, config).unwrap())))];
    let s = opened.unwrap();
    let mut next = 1_000_000u64;
    let mut writes = |n: u64, sequential: bool| {
        let first = next;
        next += n;
        cost(&store, || {
            for i in first..first + n {
                let id = if sequential { (1 << 20) + i - first } else { scattered(i) };
                s.write_block(BlockId(id), &sparse_block(i)).unwrap();
            }
            s.flush().unwrap();
        })
    };
    table.push(("1 random 4 KiB write + FLUSH", writes(1, false)));
    table.push(("16 random writes + FLUSH", writes(16, false)));
    table.push(("256 random writes + FLUSH", writes(256, false)));
    table.push(("1 MiB sequential (256 blocks) + FLUSH", writes(256, true)));
    let folding = (delta_entries as u64 + 1).saturating_sub(1 + 16 + 256 + 256).max(1);
    table.push(("random writes up to the fold + FLUSH", writes(folding, false)));
    table.push(("16 random writes + FLUSH after the fold", writes(16, false)));
    // Blocks of the sequential run, in the tree since the fold.
    let cold = CasStorage::open(store.clone(), &e, BS, config).unwrap();
    let mut buf = BlockBuf::zeroed(BS);
    table.push((
        "cold read of one block",
        cost(&store, || assert!(cold.read_block(BlockId(1 << 20), &mut buf).unwrap())),
    ));
    table.push((
        "read of a neighbour",
        cost(&store, || assert!(cold.read_block(BlockId((1 << 20) + 1), &mut buf).unwrap())),
    ));
    table
}

/// Issue 16: a FLUSH costs the new blocks and one head, not a leaf page and its ancestors per
/// scattered block, while the delta holds them; with no delta (every write in the tree, as
/// format version 1 did) the same 16 writes cost 49 PUTs.
#[test]
fn a_flush_of_scattered_writes_puts_its_chunks_and_one_head() {
    let show = |label: &str, table: &[(&str, Cost)]| {
        eprintln!("{label}:");
        for (what, c) in table {
            eprintln!("| {what} | {} | {} | {:.1} KiB |", c.gets, c.puts, c.bytes as f64 / 1024.0);
        }
    };
    let table = request_table(DEFAULT_DELTA_ENTRIES);
    show("delta_entries 1024", &table);
    let row = |what: &str| table.iter().find(|(w, _)| *w == what).unwrap().1;
    assert_eq!(row("open").gets, 1, "opening reads the head and nothing else");
    assert_eq!((row("cold read of one block").gets, row("read of a neighbour").gets), (4, 1));
    assert_eq!(row("1 random 4 KiB write + FLUSH").puts, 1 + 1);
    assert_eq!(row("16 random writes + FLUSH").puts, 16 + 1);
    assert_eq!(row("256 random writes + FLUSH").puts, 256 + 1);
    assert_eq!(row("1 MiB sequential (256 blocks) + FLUSH").puts, 256 + 1);
    let fold = row("random writes up to the fold + FLUSH");
    assert!(fold.puts > 496 + 1 + 300, "the fold stores the pages of 1024 scattered blocks: {fold:?}");
    assert_eq!(row("16 random writes + FLUSH after the fold").puts, 16 + 1, "the delta starts again");
    assert!(row("16 random writes + FLUSH").bytes < 16 * 4096 + 4096, "{:?}", row("16 random writes + FLUSH"));

    let tree_only = request_table(0);
    show("delta_entries 0", &tree_only);
    let row = |what: &str| tree_only.iter().find(|(w, _)| *w == what).unwrap().1;
    let old = row("16 random writes + FLUSH").puts;
    assert!(old >= 16 * 3, "format version 1's cost, with no delta: a leaf and its ancestors per block, not {old}");
}

/// The runs a diff from `from` to `to` must find: blocks whose content differs, by kind.
fn model_diff(from: &BTreeMap<u64, Vec<u8>>, to: &BTreeMap<u64, Vec<u8>>) -> Vec<ChangedRange> {
    let mut ids: Vec<u64> = from.keys().chain(to.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut runs: Vec<ChangedRange> = Vec::new();
    for id in ids.into_iter().filter(|id| from.get(id) != to.get(id)) {
        let change = if to.contains_key(&id) { Change::Data } else { Change::Zero };
        match runs.last_mut() {
            Some(last) if last.change == change && last.first + last.blocks == id => last.blocks += 1,
            _ => runs.push(ChangedRange { first: id, blocks: 1, change }),
        }
    }
    runs
}

/// Random writes and trims over three levels with a tiny delta, so committed maps mix deltas
/// and folds: the diff of any two equals the model's, and `info`'s walk counts the model's
/// blocks and distinct chunks.
#[test]
fn diffs_and_counts_across_deltas_and_folds_match_the_model() {
    use rand::{Rng, SeedableRng};
    let store = Arc::new(MemoryObjects::default());
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let ids: Vec<u64> = (0..40).chain(1000..1040).chain([5000, 5001, 1 << 20, (1 << 20) + 3]).collect();
    let mut commits: Vec<(Root, BTreeMap<u64, Vec<u8>>)> = vec![(Root::EMPTY, BTreeMap::new())];
    for (export, delta_entries) in [("a", 4), ("b", 0), ("c", 9)] {
        let config = CasConfig { delta_entries, max_dirty_pages: 3, cached_pages: 2, ..CasConfig::default() };
        let s = CasStorage::open(store.clone(), &name(export), BLOCK_SIZE, config).unwrap();
        let mut model = BTreeMap::new();
        for round in 0..12 {
            for _ in 0..rng.random_range(1..15) {
                let id = ids[rng.random_range(0..ids.len())];
                if rng.random_bool(0.8) {
                    let data = block(rng.random_range(0..6));
                    s.write_block(BlockId(id), &data).unwrap();
                    model.insert(id, data);
                } else {
                    s.delete_block(BlockId(id)).unwrap();
                    model.remove(&id);
                }
            }
            s.flush().unwrap();
            let root = s.committed_root();
            if round % 3 == 0 {
                assert!(!root.delta.is_empty() || delta_entries == 0, "{export}: a delta is committed");
            }
            commits.push((root, model.clone()));
        }
    }
    assert!(commits.iter().any(|(r, _)| r.delta.len() > 1 && r.page.is_some()), "a tree and a delta at once");
    for (from, from_model) in &commits {
        for (to, to_model) in commits.iter().step_by(3) {
            assert_eq!(ops::diff(&*store, from, to).unwrap(), model_diff(from_model, to_model), "{from:?} -> {to:?}");
        }
        let mut walk = usage::MapWalk::with_chunks();
        assert_eq!(walk.add(&*store, from).unwrap(), from_model.len() as u64, "{from:?}");
        let distinct: std::collections::HashSet<&Vec<u8>> = from_model.values().collect();
        assert_eq!(walk.distinct_chunks(), distinct.len() as u64, "{from:?}");
    }
}

/// A map's identity in a diff stream is its tree with the delta folded in: exports holding the
/// same blocks match whatever share of them their deltas hold.
#[test]
fn maps_with_the_same_blocks_fold_to_the_same_tree() {
    let store = Arc::new(MemoryObjects::default());
    let mut roots = Vec::new();
    for (export, delta_entries) in [("t", 0), ("d", DEFAULT_DELTA_ENTRIES), ("s", 2)] {
        let config = CasConfig { delta_entries, ..CasConfig::default() };
        let s = CasStorage::open(store.clone(), &name(export), BLOCK_SIZE, config).unwrap();
        for id in [1u64, 5, 2000, 1 << 20] {
            s.write_block(BlockId(id), &block(id as u8)).unwrap();
        }
        s.delete_block(BlockId(5)).unwrap();
        s.flush().unwrap();
        roots.push(s.committed_root());
    }
    assert!(roots[0].delta.is_empty() && roots[1].page.is_none() && roots[2].delta.len() == 2, "{roots:?}");
    let folded: Vec<Root> = roots.iter().map(|r| ops::folded(&*store, r).unwrap()).collect();
    assert!(folded.iter().all(|f| *f == roots[0]), "{folded:?}");
}

/// A block whose first bytes are its index, so blocks written with one `fill` differ.
fn indexed_block(size: usize, id: u64, fill: u8) -> Vec<u8> {
    let mut data = vec![fill; size];
    data[..8].copy_from_slice(&id.to_le_bytes());
    data
}

#[test]
fn a_flush_racing_writes_commits_a_delta_the_export_reopens_with() {
    use crate::storage::objects::faulty::Request;
    use std::sync::Condvar;
    let limit = MAX_DELTA_ENTRIES / 2;
    let store = Arc::new(FaultyObjects::new(true));
    // Page PUTs: (0) fail, (1) wait, (2) pass; and whether one has started.
    let gate = Arc::new((Mutex::new((0u8, false)), Condvar::new()));
    let hook = gate.clone();
    store.before_each(move |request| {
        let Request::Put(key) = request else { return Ok(()) };
        if !key.starts_with("cas/pages/") {
            return Ok(());
        }
        let (mode, changed) = &*hook;
        let mut mode = mode.lock().unwrap();
        if mode.0 == 0 {
            return Err("page PUTs fail for now".into());
        }
        mode.1 = true;
        changed.notify_all();
        while mode.0 == 1 {
            mode = changed.wait(mode).unwrap();
        }
        Ok(())
    });
    let set_mode = |to: u8| {
        gate.0.lock().unwrap().0 = to;
        gate.1.notify_all();
    };
    let config = CasConfig { delta_entries: limit, ..CasConfig::default() };
    let s = CasStorage::open(store.clone(), &name("e"), BLOCK_SIZE, config).unwrap();
    let limit = limit as u64;
    let write = |id: u64, fill: u8| s.write_block(BlockId(id), &indexed_block(BLOCK_SIZE, id, fill));
    for id in 0..limit {
        write(id, 1).unwrap();
    }
    // This write's fold fails (its page PUTs do): the overlay keeps limit + 1 blocks.
    assert!(write(limit, 1).is_err());
    set_mode(1);
    std::thread::scope(|scope| {
        let flush = scope.spawn(|| s.flush());
        let mut started = gate.0.lock().unwrap();
        while !started.1 {
            started = gate.1.wait(started).unwrap();
        }
        drop(started);
        // While the FLUSH's fold stores its pages: every block it folds written again, new ones
        // up to twice the limit, and one more.
        for id in 0..2 * limit {
            write(id, 2).unwrap();
        }
        let last = scope.spawn(|| write(2 * limit, 3));
        // Until that write is in the overlay, or has had time to be (it waits for the fold).
        for _ in 0..200 {
            if lock(&s.state).overlay.len() as u64 > 2 * limit {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        set_mode(2);
        flush.join().unwrap().unwrap();
        last.join().unwrap().unwrap();
    });
    let committed = s.committed_root().delta.len();
    let reopened = CasStorage::open(store.clone(), &name("e"), BLOCK_SIZE, config).map(|_| ());
    assert!(reopened.is_ok(), "the FLUSH committed a delta of {committed} entries: {reopened:?}");
    assert!(lock(&s.state).overlay.len() <= 2 * limit as usize, "the overlay outgrew twice its limit");
}

#[test]
fn a_delta_readers_would_refuse_is_never_committed() {
    let store = Arc::new(MemoryObjects::default());
    let s = open(&store, "e");
    let chunk = Some(Hash::of(&block(1)));
    let delta = Delta::new((0..=MAX_DELTA_ENTRIES as u64).map(|id| (id, chunk)).collect());
    let refused = s.commit(Root { delta, ..Root::EMPTY });
    assert!(refused.is_err(), "a delta of more than {MAX_DELTA_ENTRIES} entries was committed");
    assert!(keys(&store, "cas/heads/").is_empty(), "no head is written");
}
#[test]
fn a_snapshot_racing_a_grow_keeps_gc_and_the_snapshot_working() {
    let store = Arc::new(MemoryObjects::default());
    let s = open(&store, "e");
    let old_size = 100 * BLOCK_SIZE as u64;
    // The grow and this write land after the snapshot read the export's size, before its head.
    s.write_block(BlockId(150), &block(1)).unwrap();
    s.flush().unwrap();
    ops::take_snapshot(&*store, &name("e"), &name("s"), old_size, BLOCK_SIZE).unwrap();
    let options = gc::GcOptions { grace: Duration::ZERO, dry_run: true, force: true };
    let report = gc::gc(&*store, &options, &mut |_, _, _| {}).map(|_| ());
    assert!(report.is_ok(), "GC stops on the snapshot: {report:?}");
    let opened = CasStorage::open_snapshot(store.clone(), &name("e"), &name("s"), BLOCK_SIZE).map(|_| ());
    assert!(opened.is_ok(), "the snapshot does not open: {opened:?}");
}

#[test]
fn a_diff_of_two_commits_sharing_a_delta_reads_only_what_changed() {
    let (store, e) = sparse_terabyte(2000);
    let data = sparse_block;
    let s = CasStorage::open(store.clone(), &e, BS, CasConfig::default()).unwrap();
    for i in 100_000..100_500 {
        s.write_block(BlockId(scattered(i)), &data(i)).unwrap();
    }
    s.flush().unwrap();
    let before = s.committed_root();
    s.write_block(BlockId(scattered(7)), &data(1_000_000)).unwrap();
    s.flush().unwrap();
    let after = s.committed_root();
    assert_eq!(before.page, after.page, "both commits share the tree");
    store.reads.store(0, Ordering::Relaxed);
    let runs = ops::diff(&*store, &before, &after).unwrap();
    let gets = store.reads.load(Ordering::Relaxed);
    assert_eq!(runs, [ChangedRange { first: scattered(7), blocks: 1, change: Change::Data }]);
    assert!(gets <= 10, "a diff of one changed block read {gets} pages");
}

//! Tests of the `cas` GC on [`MemoryObjects`]: what it frees, what it must keep, and the same
//! scenario run with each of its safety rules switched off, to show each one is needed; and the
//! scenario under load once more on the S3 server of the tests' environment (docs/TESTING.md).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::super::format::{head_key, Page};
use super::super::{ops, CasConfig, CasStorage, DEFAULT_DELTA_ENTRIES};
use super::*;
use crate::storage::objects::faulty::{FaultyObjects, Request};
use crate::storage::objects::MemoryObjects;
use crate::storage::{BlockId, Storage};
use crate::{lock, ExportName};

const BLOCK_SIZE: usize = 512;

fn name(s: &str) -> ExportName {
    ExportName::new(s).unwrap()
}

/// A block whose bytes differ for every seed.
fn block(seed: u64) -> Vec<u8> {
    let mut data = vec![0; BLOCK_SIZE];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut data);
    data
}

fn open(store: Arc<dyn ObjectStore>, export: &str, config: CasConfig) -> CasStorage {
    CasStorage::open(store, &name(export), BLOCK_SIZE, config).unwrap()
}

fn read(s: &dyn Storage, id: u64) -> Result<Option<Vec<u8>>> {
    let mut buf = BlockBuf::zeroed(BLOCK_SIZE);
    Ok(s.read_block(BlockId(id), &mut buf)?.then(|| buf.to_vec()))
}

/// The chunk and page keys in the store.
fn objects(store: &dyn ObjectStore) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for prefix in ["cas/chunks/", "cas/pages/"] {
        store
            .list(prefix, None, &mut |l| {
                found.insert(l.key);
                true
            })
            .unwrap();
    }
    found
}

/// Upload permits are one setting for the whole process: the tests with 30 ms permits share
/// it (read), a test that needs another has it alone (write).
static PERMITS: RwLock<()> = RwLock::new(());

/// Upload permits, and so the GC's wait before it deletes, as short as these tests' grace
/// periods need, until the guard is dropped.
fn short_permits() -> RwLockReadGuard<'static, ()> {
    let shared = PERMITS.read().unwrap_or_else(PoisonError::into_inner);
    set_upload_permit(Duration::from_millis(30));
    shared
}

/// Upload permits of `period` for this test alone, until the guard is dropped.
fn permits_alone(period: Duration) -> RwLockWriteGuard<'static, ()> {
    let alone = PERMITS.write().unwrap_or_else(PoisonError::into_inner);
    set_upload_permit(period);
    alone
}

/// A GC that frees everything unreferenced at once (no writer runs in these tests).
fn gc_now(store: &dyn ObjectStore) -> GcReport {
    gc(store, &GcOptions { grace: Duration::ZERO, dry_run: false, force: true }, &mut |_, _, _| {}).unwrap()
}

/// Export `e` with blocks 0 and 5000 (a two-level map), snapshot `s1`, then block 5000
/// rewritten: `s1` alone references the old chunk of block 5000, its root and its leaf of 5000.
fn export_with_snapshot(store: &Arc<MemoryObjects>) -> (CasStorage, BTreeSet<String>, BTreeSet<String>) {
    // Every write in the tree, so the snapshot's blocks are in its pages.
    let s = open(store.clone(), "e", CasConfig { delta_entries: 0, ..CasConfig::default() });
    s.write_block(BlockId(0), &block(1)).unwrap();
    s.write_block(BlockId(5000), &block(2)).unwrap();
    s.flush().unwrap();
    ops::take_snapshot(&**store, &name("e"), &name("s1"), 1 << 30, BLOCK_SIZE).unwrap();
    let at_snapshot = objects(&**store);
    s.write_block(BlockId(5000), &block(3)).unwrap();
    s.flush().unwrap();
    // The leaf holding block 0 is shared by the snapshot and the head.
    let shared_leaf = at_snapshot
        .iter()
        .find(|key| {
            let Some(hash) = key.strip_prefix("cas/pages/").and_then(|k| Hash::parse_hex(&k[3..])) else {
                return false;
            };
            let bytes = store.get(key, usize::MAX).unwrap().unwrap().bytes;
            Page::decode(&"test", key, &bytes, &hash, 0)
                .is_ok_and(|p| p.entries == [(0, Entry::Chunk(Hash::of(&block(1))))].into())
        })
        .unwrap()
        .clone();
    let only_snapshot: BTreeSet<String> = at_snapshot
        .into_iter()
        .filter(|k| k.starts_with("cas/pages/") && *k != shared_leaf)
        .chain([chunk_key(&Hash::of(&block(2)))])
        .collect();
    assert_eq!(only_snapshot.len(), 3, "{only_snapshot:?}");
    (s, only_snapshot, objects(&**store))
}

/// Deleting a snapshot and running the GC frees exactly the chunk and pages only that snapshot
/// referenced; while a clone of it lives, nothing; once the clone is deleted too, those.
#[test]
fn deleting_a_snapshot_frees_exactly_what_only_it_referenced() {
    let _permits = short_permits();
    let store = Arc::new(MemoryObjects::default());
    let (s, only_snapshot, all) = export_with_snapshot(&store);
    assert_eq!(gc_now(&*store).freed_objects, 0, "everything is referenced");
    ops::clone_snapshot(&*store, &name("e"), &name("s1"), &name("c")).unwrap();
    ops::delete_snapshot(&*store, &name("e"), &name("s1")).unwrap();
    assert_eq!(gc_now(&*store).freed_objects, 0, "the clone references what the snapshot did");
    assert_eq!(objects(&*store), all);
    store.delete(&[head_key(&name("c"))], None).unwrap();
    let bytes: u64 = only_snapshot.iter().map(|k| store.get(k, usize::MAX).unwrap().unwrap().bytes.len() as u64).sum();
    let report = gc_now(&*store);
    let freed: BTreeSet<String> = all.difference(&objects(&*store)).cloned().collect();
    assert_eq!(freed, only_snapshot);
    assert_eq!((report.freed_objects, report.freed_bytes), (3, bytes));
    let again = open(store.clone(), "e", CasConfig::default());
    assert_eq!(read(&again, 0).unwrap(), Some(block(1)));
    assert_eq!(read(&again, 5000).unwrap(), Some(block(3)));
    drop(s);
    assert_eq!(gc_now(&*store).freed_objects, 0, "a second GC finds nothing more");
}

/// Stored bytes count each distinct live chunk once, however many exports and snapshots share it.
#[test]
fn stored_bytes_count_shared_chunks_once() {
    let _permits = short_permits();
    let store = Arc::new(MemoryObjects::default());
    for export in ["a", "b"] {
        let s = open(store.clone(), export, CasConfig::default());
        for id in 0..4 {
            s.write_block(BlockId(id), &block(id % 2)).unwrap();
        }
        s.flush().unwrap();
    }
    ops::take_snapshot(&*store, &name("a"), &name("s"), 1 << 20, BLOCK_SIZE).unwrap();
    assert_eq!(stored_bytes(&*store).unwrap(), 2 * BLOCK_SIZE as u64);
}

/// A head, snapshot record or page that cannot be decoded stops the GC with an error naming it,
/// and nothing is deleted, not even garbage.
#[test]
fn an_unreadable_map_stops_the_gc_before_it_deletes_anything() {
    let _permits = short_permits();
    let store = Arc::new(MemoryObjects::default());
    let (_s, _, _) = export_with_snapshot(&store);
    ops::delete_snapshot(&*store, &name("e"), &name("s1")).unwrap();
    let before = objects(&*store);
    let root = ops::head_root(&*store, &name("e")).unwrap().page.unwrap();
    let page = page_key(&root);
    let good = store.get(&page, usize::MAX).unwrap().unwrap().bytes;
    let force = GcOptions { grace: Duration::ZERO, dry_run: false, force: true };
    for (key, bytes) in
        [(page.clone(), good[..good.len() - 1].to_vec()), (head_key(&name("e")), b"nbds3-cas-head 1\n".to_vec())]
    {
        let original = store.get(&key, usize::MAX).unwrap().unwrap().bytes;
        store.put(&key, &bytes, Put::Always, None).unwrap();
        let err = gc(&*store, &force, &mut |_, _, _| {}).unwrap_err().to_string();
        assert!(err.contains(&key) && err.contains("nothing deleted"), "{err}");
        assert_eq!(objects(&*store), before);
        store.put(&key, &original, Put::Always, None).unwrap();
    }
    store.delete(std::slice::from_ref(&page), None).unwrap();
    let err = gc(&*store, &force, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(err.contains(&page) && err.contains("missing"), "{err}");
}

/// Grace periods shorter than what writers assume are refused unless forced; uploads younger
/// than the grace period are kept, and a dry run deletes nothing.
#[test]
fn young_uploads_are_kept_and_short_grace_periods_refused() {
    let _permits = short_permits();
    let store = Arc::new(MemoryObjects::default());
    let s = open(store.clone(), "e", CasConfig::default());
    s.write_block(BlockId(1), &block(1)).unwrap();
    let short = GcOptions { grace: Duration::from_secs(60), ..GcOptions::default() };
    let err = gc(&*store, &short, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(err.contains("grace") && err.contains("force"), "{err}");
    let report = gc(&*store, &GcOptions::default(), &mut |_, _, _| {}).unwrap();
    assert_eq!((report.freed_objects, report.young_objects), (0, 1));
    let dry = GcOptions { grace: Duration::ZERO, dry_run: true, force: true };
    assert_eq!(gc(&*store, &dry, &mut |_, _, _| {}).unwrap().freed_objects, 1);
    s.flush().unwrap();
    assert_eq!(read(&open(store.clone(), "e", CasConfig::default()), 1).unwrap(), Some(block(1)));
}

/// A writer whose uploads stay uncommitted longer than the GC's grace period uploads them again
/// before they are that old, so a GC between the write and the FLUSH keeps them.
#[test]
fn a_writer_refreshes_uploads_it_keeps_uncommitted() {
    // Its uploads in the tree's pages (no delta) and in the delta.
    for delta_entries in [0, DEFAULT_DELTA_ENTRIES] {
        writer_refreshes_uploads(delta_entries);
    }
}

fn writer_refreshes_uploads(delta_entries: usize) {
    let _permits = short_permits();
    let store = Arc::new(MemoryObjects::default());
    let config =
        CasConfig { refresh_uncommitted_after: Duration::from_millis(20), delta_entries, ..CasConfig::default() };
    let s = open(store.clone(), "e", config);
    s.write_block(BlockId(1), &block(1)).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    s.write_block(BlockId(2), &block(2)).unwrap();
    let grace = GcOptions { grace: Duration::from_millis(40), dry_run: false, force: true };
    assert_eq!(gc(&*store, &grace, &mut |_, _, _| {}).unwrap().freed_objects, 0);
    s.flush().unwrap();
    let again = open(store.clone(), "e", CasConfig::default());
    assert_eq!((read(&again, 1).unwrap(), read(&again, 2).unwrap()), (Some(block(1)), Some(block(2))));
}

const GC_THREAD: &str = "gc";

/// A store whose head and snapshot reads are slow on the GC's thread, as marking a large bucket
/// is: the time between listing and marking is what the GC's ordering must survive.
fn slow_marking() -> Arc<FaultyObjects> {
    let store = Arc::new(FaultyObjects::new(true));
    store.before_each(|request| {
        if let Request::Get(key) = request {
            if std::thread::current().name() == Some(GC_THREAD) && !key.starts_with("cas/pages/") {
                std::thread::sleep(Duration::from_millis(40));
            }
        }
        Ok(())
    });
    store
}

/// Where a load runs and how its clocks are set.
struct Load {
    /// A client of the store: the GC, each writer and the final check get their own.
    connect: Arc<dyn Fn() -> Arc<dyn ObjectStore> + Send + Sync>,
    /// The GC's grace period.
    grace: Duration,
    /// The GC's rest between two runs: each run holds uploads for an upload permit and more.
    gc_pause: Duration,
    /// How often writers refresh their uncommitted uploads: often enough that a writer thread
    /// stalled by a busy machine for less than the rest of the grace period still does in time.
    writer_refresh: Duration,
    /// Writes between two FLUSHes, and the pause after each: an uncommitted window longer than
    /// the grace period.
    writes_per_flush: usize,
    pause: Duration,
    /// How long the writers go on.
    run_for: Duration,
    /// How many times a writer tries a write, delete or FLUSH that failed again, as a client
    /// does after an error (and the cache's write-back after a failed upload): on a busy machine
    /// a request may outlast its upload permit. A loss still shows when the exports are read.
    retries: u32,
}

impl Load {
    /// On one [`slow_marking`] store shared by all, with a 300 ms grace and refreshes every 50 ms
    /// (a writer may stall 250 ms).
    fn memory() -> Self {
        let store = slow_marking();
        Load {
            connect: Arc::new(move || store.clone() as Arc<dyn ObjectStore>),
            grace: Duration::from_millis(300),
            gc_pause: Duration::ZERO,
            writer_refresh: Duration::from_millis(50),
            writes_per_flush: 60,
            pause: Duration::from_millis(8),
            run_for: Duration::from_secs(3),
            retries: 0,
        }
    }

    /// With writers that refresh their uploads only after `refresh`.
    fn refreshing_after(self, refresh: Duration) -> Self {
        Load { writer_refresh: refresh, ..self }
    }
}

/// What every export and snapshot should read: block → content seed.
type Model = HashMap<u64, u64>;

/// Writers write, flush, snapshot, clone, delete snapshots and clones while the GC runs in a
/// loop with `rules`; returns what then fails to read back as its model (empty when nothing
/// was lost), how many objects the GC freed, and the longest a writer went between two
/// operations (a writer refreshes only when it writes or flushes: a longer stall than the grace
/// period minus `writer_refresh` voids its promise). The caller sets the upload permits.
fn gc_under_load(load: &Load, rules: Rules, shared: bool, seed: u64) -> LoadOutcome {
    let done = Arc::new(AtomicBool::new(false));
    let problems = Arc::new(Mutex::new(Vec::new()));
    let longest_stall = Arc::new(Mutex::new(Duration::ZERO));
    // Live exports and snapshots with their models, as the writers left them.
    let exports: Arc<Mutex<HashMap<String, Model>>> = Arc::default();
    let snapshots: Arc<Mutex<HashMap<(String, String), Model>>> = Arc::default();
    let gc_thread = {
        let (store, done, problems) = ((load.connect)(), done.clone(), problems.clone());
        let (grace, gc_pause) = (load.grace, load.gc_pause);
        std::thread::Builder::new()
            .name(GC_THREAD.into())
            .spawn(move || {
                let options = GcOptions { grace, dry_run: false, force: true };
                let mut freed = 0;
                while !done.load(Ordering::Relaxed) {
                    match collect(&*store, &options, rules, &mut |_, _, _| {}) {
                        Ok(report) => freed += report.freed_objects,
                        Err(e) => lock(&problems).push(format!("gc: {e}")),
                    }
                    std::thread::sleep(gc_pause);
                }
                freed
            })
            .unwrap()
    };
    let config = CasConfig {
        refresh_uncommitted_after: load.writer_refresh,
        max_dirty_pages: 2,
        delta_entries: 4,
        ..CasConfig::default()
    };
    let (writes_per_flush, pause, run_for, retries) = (load.writes_per_flush, load.pause, load.run_for, load.retries);
    let retried = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (store, problems, exports, snapshots, longest_stall, retried) = (
                (load.connect)(),
                problems.clone(),
                exports.clone(),
                snapshots.clone(),
                longest_stall.clone(),
                retried.clone(),
            );
            let retrying = move |op: &mut dyn FnMut() -> Result<()>| {
                let mut tries = 0;
                loop {
                    match op() {
                        Err(_) if tries < retries => {
                            tries += 1;
                            retried.fetch_add(1, Ordering::Relaxed);
                        }
                        done => return done,
                    }
                }
            };
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 10 + w);
                let export = format!("w{w}");
                let s = open(store.clone(), &export, config);
                let (mut working, mut committed) = (Model::new(), Model::new());
                let mut mine: Vec<String> = Vec::new();
                let started = Instant::now();
                let mut round = 0;
                let mut last_op = Instant::now();
                let stalled = |last_op: &mut Instant| {
                    let mut longest = lock(&longest_stall);
                    *longest = (*longest).max(last_op.elapsed());
                    *last_op = Instant::now();
                };
                while started.elapsed() < run_for {
                    round += 1;
                    // An uncommitted window longer than the GC's grace period.
                    for _ in 0..writes_per_flush {
                        stalled(&mut last_op);
                        let id =
                            if rng.random_bool(0.8) { rng.random_range(0..48) } else { 3000 + rng.random_range(0..8) };
                        // With `shared`, a few contents every writer writes, which fall out of
                        // every map and are written again; otherwise new contents, or the
                        // block's own again (a skipped upload).
                        let content = match (shared && rng.random_bool(0.5), working.get(&id)) {
                            (true, _) => rng.random_range(0..40),
                            (false, Some(&same)) if rng.random_bool(0.2) => same,
                            _ => rng.random::<u64>() | 1 << 63,
                        };
                        let result = if rng.random_bool(0.1) {
                            retrying(&mut || s.delete_block(BlockId(id))).map(|()| working.remove(&id)).map(drop)
                        } else {
                            retrying(&mut || s.write_block(BlockId(id), &block(content)))
                                .map(|()| working.insert(id, content))
                                .map(drop)
                        };
                        if let Err(e) = result {
                            lock(&problems).push(format!("{export}: write {id}: {e}"));
                            return;
                        }
                        std::thread::sleep(pause);
                    }
                    stalled(&mut last_op);
                    if let Err(e) = retrying(&mut || s.flush()) {
                        lock(&problems).push(format!("{export}: flush: {e}"));
                        return;
                    }
                    committed.clone_from(&working);
                    last_op = Instant::now();
                    lock(&exports).insert(export.clone(), committed.clone());
                    let snap = format!("s{round}");
                    if rng.random_bool(0.5) {
                        ops::take_snapshot(&*store, &name(&export), &name(&snap), 1 << 30, BLOCK_SIZE).unwrap();
                        lock(&snapshots).insert((export.clone(), snap.clone()), committed.clone());
                        mine.push(snap);
                    }
                    if !mine.is_empty() && rng.random_bool(0.3) {
                        let old = mine.swap_remove(rng.random_range(0..mine.len()));
                        if let Some(model) = lock(&snapshots).get(&(export.clone(), old.clone())).cloned() {
                            let clone = format!("{export}c{round}");
                            ops::clone_snapshot(&*store, &name(&export), &name(&old), &name(&clone)).unwrap();
                            lock(&exports).insert(clone.clone(), model);
                            // Sometimes the clone lives on alone, sometimes it is deleted at once.
                            if rng.random_bool(0.3) {
                                store.delete(&[head_key(&name(&clone))], None).unwrap();
                                lock(&exports).remove(&clone);
                            }
                        }
                        ops::delete_snapshot(&*store, &name(&export), &name(&old)).unwrap();
                        lock(&snapshots).remove(&(export.clone(), old));
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let freed = gc_thread.join().unwrap();
    let mut problems = std::mem::take(&mut *lock(&problems));
    let check = |what: &str, s: &dyn Storage, model: &Model, problems: &mut Vec<String>| {
        for (id, content) in model {
            match read(s, *id) {
                Ok(Some(data)) if data == block(*content) => {}
                Ok(_) => problems.push(format!("{what}: block {id} reads other bytes")),
                Err(e) => problems.push(format!("{what}: block {id}: {e}")),
            }
        }
    };
    let store = (load.connect)();
    for (export, model) in lock(&exports).iter() {
        check(export, &open(store.clone(), export, CasConfig::default()), model, &mut problems);
    }
    for ((export, snap), model) in lock(&snapshots).iter() {
        let s = CasStorage::open_snapshot(store.clone(), &name(export), &name(snap), BLOCK_SIZE).unwrap();
        check(&format!("{export}@{snap}"), &s, model, &mut problems);
    }
    let longest_stall = *lock(&longest_stall);
    LoadOutcome { problems, freed, longest_stall, retried: retried.load(Ordering::Relaxed) }
}

/// What [`gc_under_load`] found.
struct LoadOutcome {
    /// What did not read back as its model, and what failed for good; empty when nothing was
    /// lost.
    problems: Vec<String>,
    /// Objects the GC freed.
    freed: u64,
    /// The longest a writer went between two operations.
    longest_stall: Duration,
    /// Operations tried again (see [`Load::retries`]).
    retried: u64,
}

/// GC in a loop beside writers that write, flush, snapshot, clone and delete: every export and
/// snapshot reads back its model, and the GC did free garbage meanwhile.
#[test]
fn gc_under_load_keeps_every_export_and_snapshot() {
    let _permits = short_permits();
    let LoadOutcome { problems, freed, longest_stall, .. } = gc_under_load(&Load::memory(), ALL_RULES, false, 1);
    assert!(problems.is_empty(), "longest writer stall {longest_stall:?}: {problems:#?}");
    assert!(freed > 0, "the GC freed nothing, so the test proves little");
}

/// The same without the grace period: the GC frees uploads the writers have not committed yet.
#[test]
fn gc_under_load_without_the_grace_period_loses_data() {
    let _permits = short_permits();
    let lost = gc_under_load(&Load::memory(), Rules { grace: false, ..ALL_RULES }, false, 2).problems;
    assert!(!lost.is_empty(), "no loss seen without the grace period");
}

/// The same with heads read before the listing, and no second look under the sweep lease: what
/// is committed in between is freed.
#[test]
fn gc_under_load_marking_before_listing_loses_data() {
    let rules = Rules { list_first: false, lease: false, ..ALL_RULES };
    assert!(loses_data(rules, false), "no loss seen when marking before listing");
}

/// Whether a few runs under load with `rules` lose data (one run may not hit the race).
fn loses_data(rules: Rules, shared: bool) -> bool {
    let _permits = short_permits();
    (0..6).any(|seed| !gc_under_load(&Load::memory(), rules, shared, 100 + seed).problems.is_empty())
}

/// The same with writers that never refresh their uncommitted uploads: the GC frees them.
#[test]
fn gc_under_load_with_writers_that_do_not_refresh_loses_data() {
    let _permits = short_permits();
    let never = Duration::from_secs(3600);
    let lost = (0..6).any(|seed| {
        !gc_under_load(&Load::memory().refreshing_after(never), ALL_RULES, false, 200 + seed).problems.is_empty()
    });
    assert!(lost, "no loss seen with writers that do not refresh");
}

/// Writers under load that write contents which fall out of every map and are written again
/// (dedup of garbage): every export and snapshot still reads back its model, because uploads
/// wait while the GC deletes and the GC looks again after the uploads it allowed are done.
#[test]
fn gc_under_load_with_writers_rewriting_garbage() {
    let _permits = short_permits();
    let LoadOutcome { problems, freed, longest_stall, .. } = gc_under_load(&Load::memory(), ALL_RULES, true, 5);
    assert!(problems.is_empty(), "longest writer stall {longest_stall:?}: {problems:#?}");
    assert!(freed > 0, "the GC freed nothing, so the test proves little");
}

/// The same without the sweep lease: a chunk the GC listed as old garbage, uploaded again by a
/// writer while the GC marks and committed after the GC read that writer's head, is deleted.
#[test]
fn gc_under_load_with_writers_rewriting_garbage_loses_data_without_the_sweep_lease() {
    assert!(loses_data(Rules { lease: false, ..ALL_RULES }, true), "no loss seen without the sweep lease");
}

/// Prints `message` past cargo's capture of passing tests' output, as `tests/common::note` does.
fn note(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{}: {message}", std::thread::current().name().unwrap_or("?"));
}

/// The S3 server of the tests' environment (`NBDS3_S3_ENDPOINT`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, as in docs/TESTING.md) with a bucket of its own named after `what`,
/// removed on drop; `None`, after saying why, where there is none (outside CI: in CI that fails)
/// or where it ignores conditional writes.
fn s3_bucket(what: &str) -> Option<OwnBucket> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(endpoint), Some(access_key), Some(secret_key)) =
        (var("NBDS3_S3_ENDPOINT"), var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
    else {
        assert!(var("CI").is_none_or(|ci| ci == "false"), "NBDS3_S3_ENDPOINT is not set, and CI must run every test");
        note("SKIPPED: no S3 server (eval \"$(scripts/seaweedfs start)\" first)");
        return None;
    };
    let config = crate::storage::S3Config {
        bucket: format!("nbds3-gc-{what}-{}-{:x}", std::process::id(), crate::unix_nanos() % (1 << 32)),
        endpoint: Some(endpoint),
        path_style: Some(true),
        access_key: Some(access_key),
        secret_key: Some(crate::storage::Secret(secret_key)),
        ..Default::default()
    };
    crate::storage::s3::check_bucket(&config).unwrap();
    let bucket = OwnBucket { config };
    if !crate::storage::s3::probe_conditional_writes(&bucket.config).unwrap() {
        note("not run: the S3 server ignores conditional writes, which cas writers need");
        return None;
    }
    Some(bucket)
}

/// A bucket of one test's own, removed with everything in it when dropped (unless the test
/// failed: then it is left for a look).
struct OwnBucket {
    config: crate::storage::S3Config,
}

impl OwnBucket {
    /// A new transport to the bucket's server, with connections of its own.
    fn transport(&self) -> crate::storage::s3::Transport {
        crate::storage::s3::runtime().unwrap().block_on(crate::storage::s3::Transport::new(&self.config))
    }

    /// A new client of the bucket, with connections of its own.
    fn connect(&self) -> Arc<dyn ObjectStore> {
        Arc::new(crate::storage::s3::S3Objects::new(self.transport(), &self.config))
    }
}

impl Drop for OwnBucket {
    fn drop(&mut self) {
        if std::thread::panicking() {
            note(&format!("left bucket {} as the test failed", self.config.bucket));
            return;
        }
        let transport = self.transport();
        let store = crate::storage::s3::S3Objects::new(transport.clone(), &self.config);
        let mut keys = Vec::new();
        store
            .list("", None, &mut |l| {
                keys.push(l.key);
                true
            })
            .unwrap();
        store.delete(&keys, None).unwrap();
        let deleted = transport.sdk.delete_bucket().bucket(&self.config.bucket).send();
        crate::storage::s3::runtime().unwrap().block_on(deleted).unwrap();
    }
}

/// Upload permits on the S3 server. A writer sends a PUT while its permit has more than half
/// its period left, and the GC waits one period after taking its sweep lease before it looks
/// again; a PUT still in flight then (the client gives up at the permit's end, the server may
/// still store it) can land after that look, and the GC deletes what it had just refreshed. With
/// 300 ms and 2 s permits, PUTs on a machine busy with benchmarks (load 15) outlasted that half
/// period; 4 s permits leave 2 s. The GC's sweep holds writers this long and more, so it rests
/// 6 s between runs (back to back, writers waited most of the time: a 16 s stall; 3 s apart, a
/// 10 s one).
const S3_UPLOAD_PERMIT: Duration = Duration::from_secs(4);

/// The load on the S3 server, each writer and the GC on a client of its own. S3 lists modified
/// times to the second, so an object may look up to a second older than it is; a sweep holds
/// writers for an upload permit and then while it lists, marks again and deletes; a refresh
/// costs a GET and a PUT for each uncommitted object, and its PUTs wait out sweeps too. So the
/// grace period is 18 s, writers refresh every 3 s (a writer may stall 14 s) and write 20
/// blocks 950 ms apart between FLUSHes (an uncommitted window longer than the grace period on
/// an idle machine too, and few objects to refresh); two rounds each, so that the GC finds
/// garbage older than the grace period.
fn s3_load(bucket: &Arc<OwnBucket>) -> Load {
    let bucket = bucket.clone();
    Load {
        connect: Arc::new(move || bucket.connect()),
        grace: Duration::from_secs(18),
        gc_pause: Duration::from_secs(6),
        writer_refresh: Duration::from_secs(3),
        writes_per_flush: 20,
        pause: Duration::from_millis(950),
        run_for: Duration::from_secs(25),
        retries: 2,
    }
}

/// GC in a loop on the S3 server beside three writers that write, flush, snapshot, clone and
/// delete, some of them rewriting contents that fell out of every map: every export and
/// snapshot reads back its model through a fresh client, and the GC did free garbage.
#[test]
fn gc_under_load_on_s3_keeps_every_export_and_snapshot() {
    let Some(bucket) = s3_bucket("load") else { return };
    let bucket = Arc::new(bucket);
    let _permits = permits_alone(S3_UPLOAD_PERMIT);
    let LoadOutcome { problems, freed, longest_stall, retried } = gc_under_load(&s3_load(&bucket), ALL_RULES, true, 7);
    note(&format!(
        "the GC freed {freed} objects; longest writer stall {longest_stall:?}; {retried} operations retried"
    ));
    assert!(problems.is_empty(), "longest writer stall {longest_stall:?}: {problems:#?}");
    assert!(freed > 0, "the GC freed nothing, so the test proves little");
}
